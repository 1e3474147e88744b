#!/usr/bin/env python3
"""Cost of the calibration stage on real models: statistics + fit + correction time, peak memory.

Each model runs in a fresh process (peak RSS is the process's). The calibration inputs are made
first, by the engines' own preprocessing (``tools/calibration_sets.py``), and held in memory as a
list of feed dicts, so that the time measured is onnxfactor's, not the loader's. Then
``compress`` runs with calibration at VBMF ranks, by MACs alone (``--no-measure``: no timing of
layers, which would add the measured selection's own cost), and its timings are reported::

    python tools/bench_calibration_cost.py                   # nudenet 320n and PP-OCRv4 det, 256 inputs each
    python tools/bench_calibration_cost.py --models nudenet --count 64
    python tools/bench_calibration_cost.py --from-inputs     # every correction run from the inputs, as before the cuts
    python tools/bench_calibration_cost.py --models nudenet --correction-passes 0   # one correction pass per layer
    python tools/bench_calibration_cost.py --sequential   # statistics: ONNX Runtime and the moments in turn, as before

``--from-inputs`` runs the correction's passes and checks from the model's inputs
(``correct_chains(segments=False)``) instead of from the cut before each pass
(:mod:`onnxfactor.calibration.segments`): the same results, the previous cost.
``--sequential`` runs the statistics pass's ONNX Runtime runs and moments in turn, as before
they overlapped (:func:`onnxfactor.calibration.probe.run_ahead`: the next run computes while the
current run's moments are added): the same figures, the previous cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LOADERS = {"nudenet": "nudenet", "ppocr_det": "ppocr_det"}


def one(name: str, count: int, from_inputs: bool = False, passes: int | None = None, sequential: bool = False) -> dict:
    os.environ["ONNXFACTOR_CALIB_COUNT"] = str(count)
    import functools

    import onnxfactor.calibration as calibration
    from onnxfactor import CompressConfig, compress
    from onnxfactor.calibration import correct
    from tools import calibration_sets, model_zoo

    if sequential:
        calibration.collect_statistics = functools.partial(calibration.collect_statistics, overlap=False)
    if from_inputs:
        real = correct.correct_chains
        correct.correct_chains = lambda *a, **k: real(*a, segments=False, **k)

    path = model_zoo.nudenet_320n() if name == "nudenet" else model_zoo.ppocr("det")
    feeds = []
    for f in getattr(calibration_sets, LOADERS[name])():
        feeds.append(f)
        if len(feeds) == count:
            break
    input_mb = sum(v.nbytes for f in feeds for v in f.values()) / 2**20
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    config = CompressConfig()
    if passes is not None:
        config = dataclasses.replace(config, calibration=dataclasses.replace(config.calibration, stages=passes))
    _, report = compress(path, config=config, calibration=feeds)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tm = report.timings
    return {
        "model": name, "from_inputs": from_inputs, "sequential": sequential, "passes": report.calibration["correction"]["stages"], "samples": report.calibration["samples"], "input_shape": list(next(iter(feeds[0].values())).shape),
        "inputs_mb": round(input_mb, 1), "statistics_s": round(tm.get("calibration_statistics", 0), 1),
        "fit_s": round(tm.get("decompose", 0), 1), "correction_s": round(tm.get("correction", 0), 1),
        "total_s": round(wall, 1), "peak_rss_mb": round(peak), "rss_before_mb": round(base),
        "memory": report.calibration["memory"], "correction": report.calibration["correction"],
        "decomposed": len(report.decomposed), "layers": len(report.layers),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="nudenet,ppocr_det")
    p.add_argument("--count", type=int, default=256)
    p.add_argument("--from-inputs", action="store_true", help="run the correction from the model's inputs (the cost before the cuts)")
    p.add_argument("--correction-passes", type=int, default=None, help="--correction-passes of compress (default 8; 0: one per layer)")
    p.add_argument("--sequential", action="store_true", help="the statistics' ONNX Runtime runs and moments in turn (the cost before they overlapped)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, default=ROOT / "out" / "bench_calibration_cost.json")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.count, args.from_inputs, args.correction_passes, args.sequential)))
        return 0
    rows = []
    print("| model | inputs | input MB | statistics s | fit s | correction s | total s | peak RSS MB (before) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", name, "--count", str(args.count)] + ["--from-inputs"] * args.from_inputs
                             + ["--sequential"] * args.sequential
                             + ([] if args.correction_passes is None else ["--correction-passes", str(args.correction_passes)]),
                             capture_output=True, text=True, check=True, cwd=ROOT)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"| {name} | {r['samples']} x {'x'.join(map(str, r['input_shape'][1:]))} | {r['inputs_mb']} | {r['statistics_s']} | "
              f"{r['fit_s']} | {r['correction_s']} | {r['total_s']} | {r['peak_rss_mb']} ({r['rss_before_mb']}) |", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
