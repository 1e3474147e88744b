#!/usr/bin/env python3
"""Real clients through ``onnxfactor search``: per-layer ranks chosen by a task metric, then judged by the engines.

A uniform per-layer error flips the marginal answers of mobile detectors before it buys speed
(``tools/bench_clients_calibration.py``). Here each model gets the search instead: per-layer
sensitivity curves from the data-aware output error, the Pareto front of per-layer ranks, and a
bisection of built and measured candidates judged by a *task metric* on a held-out selection set
(``--metric``, ``--min-agreement``):

* NudeNet 320n: ``tools/metrics/yolo_detections.py`` (every detection scoring >= 0.3 matched by class, IoU >= 0.9,
  score within 0.05), at least ``--min-detections`` agreement on 128 selection crops;
* PP-OCRv4 rec: ``tools/metrics/ppocr.py:rec_text`` (identical CTC-decoded text) on the lines of
  32 selection pages; PP-OCRv4 det: ``tools/metrics/ppocr.py:det_regions`` (IoU of the binarised
  text maps) on those pages.

Three disjoint sets of inputs: calibration (``tools/calibration_sets.py:nudenet``, ``:ppocr_*``,
seed 0), selection (``:*_selection``, seed 1: other crops, other faces, other pages) and the
evaluation photos of ``tools/clients.py``, which only the engines see, after the search. The
winner of each search is then run by RapidOCR / NudeNet on the evaluation photos against the
original (the agreement criteria of ``bench_clients_calibration.py``), end-to-end time summed
over the photos (interleaved medians). The searches run one candidate at a time with ONNX
Runtime's two threads, as the engines run. The same search from the command line::

    onnxfactor search 320n.onnx out.onnx --calibration tools/calibration_sets.py:nudenet \\
        --data tools/calibration_sets.py:nudenet_selection --metric tools/metrics/yolo_detections.py \\
        --min-agreement 1.0 --fractions 0.3,0.4,0.5,0.6,0.75 --jobs 1

    python tools/bench_clients_search.py                 # the three searches and the engines (~30 min)
    python tools/bench_clients_search.py --models nudenet
    python tools/bench_clients_search.py --models nudenet --layer-timing --workdir out/clients_search_timed   # front by measured ms
    python tools/bench_clients_search.py --models nudenet --finetune-steps 64 --finetune-epochs 2   # + distillation

``--finetune-steps S``: every candidate is distilled from the original for S steps (batch 8, Adam
``--lr`` 1e-4, label-free, on the calibration inputs) before it is judged, and the winner for
``--finetune-epochs`` (``onnxfactor search --finetune --search-steps S --epochs E``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools import clients  # noqa: E402
from tools.bench_clients_calibration import detector_agrees, ocr_agrees  # noqa: E402

#: name -> calibration loader, calibration samples, correction samples, selection loader, metric
SEARCHES = {
    "nudenet": ("tools/calibration_sets.py:nudenet", 256, 128, "tools/calibration_sets.py:nudenet_selection",
                "tools/metrics/yolo_detections.py:score"),
    "rec": ("tools/calibration_sets.py:ppocr_rec", 256, 64, "tools/calibration_sets.py:ppocr_rec_selection",
            "tools/metrics/ppocr.py:rec_text"),
    "det": ("tools/calibration_sets.py:ppocr_det", 64, 32, "tools/calibration_sets.py:ppocr_det_selection",
            "tools/metrics/ppocr.py:det_regions"),
}


def run_search(name: str, args, work: Path) -> dict:
    from onnxfactor import CompressConfig
    from onnxfactor.config import CalibrationConfig
    from onnxfactor.errors import ConstraintsNotMet
    from onnxfactor.validation.run import ValidationOptions
    from onnxfactor.search import Constraints, SearchConfig
    from onnxfactor.search.output import search_file
    from onnxfactor.validation.metric import TaskMetric

    loader, samples, correction, selection, metric = SEARCHES[name]
    agreement = {"nudenet": args.min_detections, "rec": args.min_text, "det": args.min_regions}[name]
    config = SearchConfig(constraints=Constraints(min_agreement=agreement), objective="latency", strategy="allocate",
                          fractions=tuple(float(f) for f in args.fractions.split(",")), round_to=args.round_to,
                          jobs=1, cache=work / f"cache_{name}", max_evaluations=args.max_evaluations,
                          latency_runs=args.latency_runs, threads=None, layer_timing=args.layer_timing,
                          timing_cache=work / f"timing_{name}.json" if args.layer_timing else None,
                          sensitivity=args.sensitivity)
    base = CompressConfig(calibration=CalibrationConfig(samples=samples, correction_samples=correction, stages=8))
    held_out = ValidationOptions(data=selection, metric=TaskMetric(metric))
    brief = full = None
    if args.finetune_steps:  # every candidate distilled briefly, the winner for --finetune-epochs
        from onnxfactor.config import FinetuneConfig

        brief = FinetuneConfig(steps=args.finetune_steps, batch_size=8, lr=args.lr)
        full = FinetuneConfig(epochs=args.finetune_epochs, batch_size=8, lr=args.lr)
    t = time.perf_counter()

    def progress(done, total, text):
        print(f"  [{name} {done}/{total}] {text}", flush=True)

    try:
        report = search_file(clients.original_models()[name], work / f"{name}.onnx", loader, held_out, config=config, base=base,
                             input_shapes=clients.INPUT_SHAPES[name], report_path=work / f"{name}.search.json", progress=progress,
                             finetune=full, brief_finetune=brief)
        feasible = True
    except ConstraintsNotMet as e:
        print(f"  {name}: {e}", flush=True)
        report = json.loads((work / f"{name}.search.json").read_text())
        feasible = False
    winner = report.get("winner")
    out = report.get("output") or {}
    return {"feasible": feasible, "seconds": time.perf_counter() - t, "candidates": len(report["candidates"]),
            "cache_hits": report.get("cache_hits"), "winner_task_metric": None if winner is None else winner.get("task_metric"),
            "winner_speedup": None if winner is None else winner.get("speedup"),
            "conv_macs_ratio": out.get("conv_macs_ratio"), "decomposed": None if winner is None else winner.get("decomposed"),
            "candidates_table": [{"macs_x": c["macs_original"] / max(c["macs"], 1), "task_metric": c.get("task_metric"),
                                  "speedup": c.get("speedup"), "violations": c.get("violations"), "decomposed": c.get("decomposed")}
                                 for c in report["candidates"]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="nudenet,rec,det")
    p.add_argument("--fractions", default="0.3,0.4,0.5,0.6,0.75")
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--min-detections", type=float, default=1.0, help="NudeNet: selection crops whose detections all match")
    p.add_argument("--min-text", type=float, default=1.0, help="PP-OCR rec: selection lines read identically")
    p.add_argument("--min-regions", type=float, default=0.95, help="PP-OCR det: mean IoU of the binarised text maps")
    p.add_argument("--max-evaluations", type=int, default=8)
    p.add_argument("--layer-timing", action="store_true", help="allocate by measured per-layer time instead of MACs")
    p.add_argument("--sensitivity", default="layer", choices=["layer", "network"], help="the allocation's per-option loss")
    p.add_argument("--latency-runs", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--finetune-steps", type=int, default=0, help="distil every candidate for this many steps (PyTorch)")
    p.add_argument("--finetune-epochs", type=float, default=2.0, help="with --finetune-steps: the winner's distillation")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (1e-3 diverged on NudeNet)")
    p.add_argument("--workdir", type=Path, default=ROOT / "out" / "clients_search")
    p.add_argument("--json", type=Path, default=ROOT / "out" / "bench_clients_search.json")
    args = p.parse_args(argv)
    os.chdir(ROOT)  # the loader and metric paths are relative to the repository
    args.workdir.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.models.split(",") if n]
    searches = {}
    for name in names:
        print(f"{name}: searching", flush=True)
        searches[name] = run_search(name, args, args.workdir)
        s = searches[name]
        print(f"{name}: {'met' if s['feasible'] else 'NOT met'} in {s['seconds']:.0f} s, {s['candidates']} candidates; chosen: "
              f"conv MACs {s['conv_macs_ratio'] or 0:.2f}x, {s['decomposed']} layers, selection metric "
              f"{s['winner_task_metric']}, selection speedup {s['winner_speedup']}", flush=True)
    originals = clients.original_models()

    def model(name):
        path = args.workdir / f"{name}.onnx"
        return path if path.exists() else originals[name]

    result = {"searches": searches, "args": vars(args) | {"workdir": str(args.workdir), "json": str(args.json)}}
    if "nudenet" in names:
        det = clients.detector_compare(originals["nudenet"], model("nudenet"), clients.load_images(clients.DETECTOR_IMAGES),
                                       repeats=args.repeats)
        s = det["summary"]
        result["nudenet_engine"] = {"agrees": detector_agrees(det["images"]), "speedup": s["ms_original"] / s["ms_compressed"],
                                    "summary": s,
                                    "detections": {n: {k: [(d["class"], round(d["score"], 3)) for d in im[f"detections_{k}"]]
                                                       for k in ("original", "compressed")} for n, im in det["images"].items()}}
        print(f"NudeNet on the evaluation photos: {'identical' if result['nudenet_engine']['agrees'] else 'DIFFERENT'} detections, "
              f"{result['nudenet_engine']['speedup']:.2f}x end to end", flush=True)
    if "rec" in names or "det" in names:
        ocr = clients.ocr_compare(originals["det"], model("det"), originals["rec"], model("rec"),
                                  clients.load_images(clients.OCR_IMAGES), repeats=args.repeats)
        s = ocr["summary"]
        result["ocr_engine"] = {"agrees": ocr_agrees(ocr["images"]), "speedup": s["ms_original"] / s["ms_compressed"], "summary": s,
                                "models": {n: str(model(n)) for n in ("det", "rec")},
                                "texts": {n: {k: [l["text"] for l in im[f"lines_{k}"]] for k in ("original", "compressed")}
                                          for n, im in ocr["images"].items()}}
        print(f"RapidOCR on the evaluation photos: {'identical' if result['ocr_engine']['agrees'] else 'DIFFERENT'} text and boxes "
              f"(min char similarity {s['min_char_similarity']:.3f}), {result['ocr_engine']['speedup']:.2f}x end to end", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
