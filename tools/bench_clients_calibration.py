#!/usr/bin/env python3
"""Real clients with calibration data: the fastest setting at which RapidOCR and NudeNet still agree.

PP-OCRv4 det + rec (RapidOCR) and NudeNet 320n are compressed with calibration data that is *not*
the evaluation photos (``tools/calibration_sets.py``: rendered text pages and crops of other
photos, preprocessed by the engines themselves), at each setting of a grid, with the CLI's
defaults otherwise (data-aware fit, sequential correction, measured selection with ONNX
Runtime's default threads, as the engines run). The statistics are collected once per model
(:func:`onnxfactor.calibrate`) and reused by every setting. Then the engines run the compressed
models on the evaluation photos of ``tools/clients.py`` (``page``, ``text``, ``coins`` for OCR;
``astronaut``, ``camera``, ``chelsea`` for the detector) against the originals:

* OCR agrees when every image's text lines are identical and every box pair has IoU >= 0.9;
* the detector agrees when every image has the same detections (classes, count) with IoU >= 0.9
  and score differences <= 0.05 (the thresholds of ``tests/integration/test_clients.py``).

Speed: end-to-end engine time summed over the images (median of interleaved calls each). Also
prints the calibration cost (statistics, fit, correction) and peak RSS per model::

    python tools/bench_clients_calibration.py                      # ~40 min
    python tools/bench_clients_calibration.py --settings error:0.1 --repeats 3
    python tools/bench_clients_calibration.py --only nudenet --settings error:0.05 --round-to 8
    python tools/bench_clients_calibration.py --only nudenet --settings error:0.05,error:0.07 --correction-passes 0
    python tools/bench_clients_calibration.py --settings error:0.1,error:0.15 --finetune 3   # + distillation

``--finetune EPOCHS`` distils each original into its compressed model on the same calibration
inputs (label-free, :mod:`onnxfactor.finetune`; batch 8, Adam ``--lr`` 1e-4, ONNX Runtime's and torch's default
threads), after the correction; the time and peak memory per epoch are printed per model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools import clients  # noqa: E402

SETTINGS = ["error:0.05", "error:0.1", "error:0.15", "error:0.2", "error:0.3", "weakened:0.3", "weakened:0.6"]
MIN_IOU, MAX_SCORE_DIFF = 0.9, 0.05
#: calibration loader, samples and correction samples per model (the detector's inputs are 992 x 736)
CALIBRATION = {
    "det": ("tools/calibration_sets.py:ppocr_det", 64, 32),
    "rec": ("tools/calibration_sets.py:ppocr_rec", 256, 64),
    "nudenet": ("tools/calibration_sets.py:nudenet", 256, 128),
}


def rank_config(setting: str, round_to: int):
    from onnxfactor import RankConfig

    name, _, value = setting.partition(":")
    if name == "error":
        return RankConfig(policy="error", target_error=float(value), round_to=round_to)
    if name == "weakened":
        return RankConfig(policy="weakened", weaken=float(value), round_to=round_to)
    return RankConfig(policy="ratio", ratio=float(value), round_to=round_to)


def config_for(name: str, setting: str | None = None, round_to: int = 1, reconstruct: int = 0, passes: int = 8):
    from onnxfactor import CompressConfig, LatencyConfig
    from onnxfactor.config import CalibrationConfig

    _, samples, correction_samples = CALIBRATION[name]
    ranks = rank_config(setting, round_to) if setting else None
    config = CompressConfig(latency=LatencyConfig(),
                            calibration=CalibrationConfig(samples=samples, correction_samples=correction_samples, stages=passes,
                                                          reconstruct_steps=reconstruct))
    return config if ranks is None else CompressConfig(ranks=ranks, latency=config.latency, calibration=config.calibration)


def ocr_agrees(summary_images: dict) -> bool:
    return all(r["text_identical"] and (r["min_box_iou"] is None or r["min_box_iou"] >= MIN_IOU) for r in summary_images.values())


def detector_agrees(images: dict) -> bool:
    return all(r["classes_equal"] and len(r["matched"]) == len(r["detections_original"]) == len(r["detections_compressed"])
               and (r["min_iou"] is None or r["min_iou"] >= MIN_IOU)
               and (r["max_score_diff"] is None or r["max_score_diff"] <= MAX_SCORE_DIFF) for r in images.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--round-to", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--reconstruct", type=int, default=0, help="--reconstruct STEPS of every compression (PyTorch)")
    p.add_argument("--finetune", type=float, default=0.0, metavar="EPOCHS", help="fine-tune every compressed model (PyTorch)")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (1e-3 diverged on NudeNet)")
    p.add_argument("--correction-passes", type=int, default=8, help="--correction-passes of every compression (0: one per layer)")
    p.add_argument("--only", default="ocr,nudenet", help="engines to run: ocr (PP-OCRv4 det + rec), nudenet")
    p.add_argument("--workdir", type=Path, default=ROOT / "out" / "clients_calibration")
    p.add_argument("--json", type=Path, default=ROOT / "out" / "bench_clients_calibration.json")
    args = p.parse_args(argv)
    engines = set(args.only.split(","))
    if not engines <= {"ocr", "nudenet"}:
        p.error(f"--only: unknown engine {', '.join(sorted(engines - {'ocr', 'nudenet'}))}; choose from ocr, nudenet")
    import onnxfactor
    from onnxfactor import compress_file

    os.chdir(ROOT)  # the loader paths are relative to the repository
    originals = clients.original_models()
    names = [n for n in CALIBRATION if (n == "nudenet" and "nudenet" in engines) or (n != "nudenet" and "ocr" in engines)]
    stats, cost = {}, {}
    for name in names:
        loader = CALIBRATION[name][0]
        t = time.perf_counter()
        stats[name] = onnxfactor.calibrate(originals[name], loader, config=config_for(name), input_shapes=clients.INPUT_SHAPES[name])
        cost[name] = {"statistics_seconds": time.perf_counter() - t, "samples": stats[name].samples,
                      "memory": stats[name].memory, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        print(f"{name}: statistics of {stats[name].samples} samples in {cost[name]['statistics_seconds']:.1f} s, "
              f"{stats[name].memory}", flush=True)
    rows = []
    ocr_images, det_images = clients.load_images(clients.OCR_IMAGES), clients.load_images(clients.DETECTOR_IMAGES)
    for setting in args.settings.split(","):
        work = args.workdir / setting.replace(":", "_")
        work.mkdir(parents=True, exist_ok=True)
        paths, reports = {}, {}
        for name in names:
            paths[name] = work / f"{name}.onnx"
            t = time.perf_counter()
            config = config_for(name, setting, args.round_to, args.reconstruct, args.correction_passes)
            if args.finetune > 0:  # compress() takes the statistics and the raw inputs for the distillation
                import onnx

                from onnxfactor.config import FinetuneConfig

                model, reports[name] = onnxfactor.compress(originals[name], config=config, input_shapes=clients.INPUT_SHAPES[name],
                                                           calibration=stats[name], finetune_data=CALIBRATION[name][0],
                                                           finetune=FinetuneConfig(epochs=args.finetune, batch_size=8, lr=args.lr))
                onnx.save(model, paths[name])
                f = reports[name].finetune
                print(f"  {name}: fine-tuned {f.get('steps')} steps, loss {f.get('loss_first')} -> {f.get('loss_last')}, "
                      f"{[e['seconds'] for e in f.get('per_epoch', [])]} s per epoch, peak RSS {f.get('peak_rss_mb')} MB", flush=True)
            else:
                reports[name] = compress_file(originals[name], paths[name], config=config,
                                              input_shapes=clients.INPUT_SHAPES[name], validation=None, calibration=stats[name])
            reports[name].timings["wall"] = time.perf_counter() - t
        none = {"images": {}, "summary": {"ms_original": None, "ms_compressed": None, "min_char_similarity": float("nan")}}
        ocr = (clients.ocr_compare(originals["det"], paths["det"], originals["rec"], paths["rec"], ocr_images, repeats=args.repeats)
               if "ocr" in engines else none)
        det = clients.detector_compare(originals["nudenet"], paths["nudenet"], det_images, repeats=args.repeats) if "nudenet" in engines else none
        row = {"setting": setting, "correction_passes": args.correction_passes, "reconstruct": args.reconstruct, "finetune_epochs": args.finetune,
               "finetune": {n: r.finetune for n, r in reports.items()},
               "models": {n: {"conv_macs_ratio": r.totals.conv_macs_ratio, "decomposed": len(r.decomposed), "layers": len(r.layers),
                              "timings": r.timings} for n, r in reports.items()},
               "ocr_agrees": "ocr" in engines and ocr_agrees(ocr["images"]),
               "detector_agrees": "nudenet" in engines and detector_agrees(det["images"]),
               "ocr": ocr["summary"], "detector": det["summary"]}
        for key, res in (("ocr", ocr), ("detector", det)):
            s = res["summary"]
            row[f"{key}_speedup"] = s["ms_original"] / s["ms_compressed"] if s["ms_original"] and s["ms_compressed"] else None
        rows.append(row)
        m, parts = row["models"], [f"{setting:13s}"]
        if "ocr" in engines:
            parts.append(f"det {m['det']['conv_macs_ratio']:.2f}x ({m['det']['decomposed']}/{m['det']['layers']}), "
                         f"rec {m['rec']['conv_macs_ratio']:.2f}x ({m['rec']['decomposed']}/{m['rec']['layers']}): OCR "
                         f"{'agrees' if row['ocr_agrees'] else 'DIFFERS'} {row['ocr_speedup']:.2f}x "
                         f"(min char sim {ocr['summary']['min_char_similarity']:.3f})")
        if "nudenet" in engines:
            parts.append(f"nudenet {m['nudenet']['conv_macs_ratio']:.2f}x ({m['nudenet']['decomposed']}/{m['nudenet']['layers']}): "
                         f"{'agrees' if row['detector_agrees'] else 'DIFFERS'} {row['detector_speedup']:.2f}x")
        print(" | ".join(parts), flush=True)
    for key, agree in (("ocr", "ocr_agrees"), ("detector", "detector_agrees")):
        ok = [r for r in rows if r[agree]]
        best = max(ok, key=lambda r: r[f"{key}_speedup"], default=None)
        print(f"fastest agreeing {key}: " + ("none" if best is None else f"{best['setting']} at {best[f'{key}_speedup']:.2f}x"))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"cost": cost, "rows": rows}, indent=1, default=str))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
