#!/usr/bin/env python3
"""Benchmark of the calibration stage on the bundled Fashion-MNIST models: accuracy at speed.

For each bundled model and each rank setting (a fixed fraction of every full rank, plain and
weakened VBMF, and the ``error`` policy at several targets), four ways to fit the same kind of
chains, all decided by MACs alone (``--no-measure``, so that the fits can be compared at equal
ranks):

* ``weights``      -- no calibration data: factors fitted to the weights (HOSVD);
* ``data``         -- ``--calibration``, ``--fit data --no-correct``: data-aware factors;
* ``+correct``     -- the default with calibration: data-aware factors + sequential correction;
* ``+reconstruct`` -- ``+correct`` and ``--reconstruct STEPS`` (PyTorch).

Calibration: the 1000 bundled *train* images (``models/fashion_mnist_calib.npz``). Accuracy: the
10 000 Fashion-MNIST *test* images (Debian ``dataset-fashion-mnist``), which the calibration never
sees. Latency: the original and the compressed model in ONNX Runtime (CPU, one thread, no
spinning), interleaved, median of many runs, at batch 1 and batch 64; a ratio in the same run.
The first conv (one input channel, 0.4 % of the MACs) is excluded as in the README's other tables.

Prints, per model and fit, the largest conv MAC cut whose top-1 loss is at most 0.5 and 1.0 point,
with its setting and measured speedups, then writes every run to JSON::

    python tools/bench_calibration.py                      # both models, full grid (~20 min)
    python tools/bench_calibration.py --models fashion_vgg_wide --settings ratio:0.25 --fits weights,correct
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.train_fashion_mnist import load_split  # noqa: E402

MODELS = ROOT / "models"
CALIB = MODELS / "fashion_mnist_calib.npz"
DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
SETTINGS = ["ratio:0.5", "ratio:0.4", "ratio:0.3", "ratio:0.25", "ratio:0.2", "ratio:0.15", "ratio:0.1",
            "vbmf", "weakened:0.6", "error:0.1", "error:0.15", "error:0.2", "error:0.3"]
FITS = ["weights", "data", "correct", "reconstruct"]


def rank_config(setting: str):
    from onnxfactor import RankConfig

    name, _, value = setting.partition(":")
    if name == "ratio":
        return RankConfig(policy="ratio", ratio=float(value))
    if name == "weakened":
        return RankConfig(policy="weakened", weaken=float(value))
    if name == "error":
        return RankConfig(policy="error", target_error=float(value))
    return RankConfig(policy=name)


def compress_one(model: Path, setting: str, fit: str, steps: int):
    from onnxfactor import CompressConfig, compress
    from onnxfactor.config import CalibrationConfig

    cal = CalibrationConfig(fit="weights" if fit == "weights" else "data", correct=fit in ("correct", "reconstruct"),
                            reconstruct_steps=steps if fit == "reconstruct" else 0, reconstruct_lr=1e-3)
    config = CompressConfig(ranks=rank_config(setting), exclude=("/0/Conv",), calibration=cal)
    t = time.perf_counter()
    compressed, report = compress(model, config=config, calibration=None if fit == "weights" else CALIB)
    return compressed, report, time.perf_counter() - t


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    from onnxfactor.validation import make_session

    session = make_session(model, ["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    pred = np.concatenate([session.run(None, {name: x[i : i + 500]})[0].argmax(1) for i in range(0, len(x), 500)])
    return float(np.mean(pred == y))


def speedups(original, compressed, x: np.ndarray, runs: int) -> dict:
    """Median latency ratio original / compressed at batch 1 and 64 (one thread, interleaved)."""
    from onnxfactor.validation import make_session, measure_latency

    out = {}
    sessions = [make_session(m, ["CPUExecutionProvider"], threads=1, measuring=True) for m in (original, compressed)]
    name = sessions[0].get_inputs()[0].name
    for batch in (1, 64):
        a, b = measure_latency(sessions, {name: x[:batch]}, runs=runs if batch == 1 else max(10, runs // 5))
        out[f"batch{batch}"] = {"original_ms": a.median_ms, "compressed_ms": b.median_ms, "speedup": a.median_ms / b.median_ms}
    return out


def best(rows: list[dict], fit: str, drop: float) -> dict | None:
    ok = [r for r in rows if r["fit"] == fit and r["original_accuracy"] - r["accuracy"] <= drop / 100 + 1e-12]
    return max(ok, key=lambda r: r["conv_macs_ratio"], default=None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="fashion_cnn,fashion_vgg_wide")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--fits", default=",".join(FITS))
    p.add_argument("--steps", type=int, default=200, help="--reconstruct steps of the reconstruct fit (default 200)")
    p.add_argument("--runs", type=int, default=200, help="interleaved latency runs at batch 1 (default 200)")
    p.add_argument("--json", type=Path, default=ROOT / "out" / "bench_calibration.json")
    args = p.parse_args(argv)
    import onnx

    x, y = load_split(DATA_DIR, "test")
    rows = []
    for name in args.models.split(","):
        path = MODELS / f"{name}.onnx"
        original = onnx.load(str(path))
        base = accuracy(original, x, y)
        print(f"{name}: original top-1 {base:.2%} on {len(x)} test images", flush=True)
        for setting in args.settings.split(","):
            for fit in args.fits.split(","):
                compressed, report, seconds = compress_one(path, setting, fit, args.steps)
                row = {
                    "model": name, "setting": setting, "fit": fit, "original_accuracy": base,
                    "accuracy": accuracy(compressed, x, y), "conv_macs_ratio": report.totals.conv_macs_ratio,
                    "decomposed": len(report.decomposed), "compress_seconds": round(seconds, 2),
                    "ranks": {l.name: l.ranks for l in report.decomposed},
                    "calibration_seconds": None if report.calibration is None else report.calibration["seconds"],
                    "correction_seconds": (report.calibration or {}).get("correction", {}) and report.calibration["correction"].get("seconds"),
                    "latency": speedups(original, compressed, x, args.runs),
                }
                rows.append(row)
                print(f"  {setting:13s} {fit:12s} MACs {row['conv_macs_ratio']:6.2f}x  top-1 {row['accuracy']:.2%}  "
                      f"speedup b1 {row['latency']['batch1']['speedup']:.2f}x b64 {row['latency']['batch64']['speedup']:.2f}x  "
                      f"({seconds:.1f} s)", flush=True)
        print(f"\n{name} (original {base:.2%}): largest conv MAC cut within the top-1 loss")
        print("| fit | loss <= 0.5 pt: MACs x | setting | top-1 | speedup b1 / b64 | loss <= 1.0 pt: MACs x | setting | top-1 | speedup b1 / b64 |")
        print("|---|---|---|---|---|---|---|---|---|")
        for fit in args.fits.split(","):
            cells = []
            for drop in (0.5, 1.0):
                r = best([r for r in rows if r["model"] == name], fit, drop)
                if r is None:
                    cells += ["-"] * 4
                else:
                    lat = r["latency"]
                    cells += [f"{r['conv_macs_ratio']:.2f}", r["setting"], f"{r['accuracy']:.2%}",
                              f"{lat['batch1']['speedup']:.2f} / {lat['batch64']['speedup']:.2f}"]
            print(f"| {fit} | " + " | ".join(cells) + " |")
        print(flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
