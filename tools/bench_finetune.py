#!/usr/bin/env python3
"""Benchmark of fine-tuning: accuracy at speed after a few minutes of label-free distillation on CPU.

Bundled models: compressed with calibration (the 1000 bundled train images: data-aware fit +
correction) at each rank setting, then fine-tuned without labels on ``--train-images`` other
Fashion-MNIST *train* images (``out/fashion_mnist_finetune.npz``, written once; disjoint from the
test split by construction), one CPU thread, at most ``--budget`` seconds of fine-tuning (the
epochs are cut to fit, measured on the first epoch). Accuracy: the 10 000 *test* images.
Latency: ONNX Runtime CPU, one thread, interleaved medians, batch 1 / 64.

NudeNet 320n (``--nudenet``): time and peak memory per epoch of fine-tuning on 256 photo crops
(``tools/calibration_sets.py``), ``--ranks error --target-error 0.1``, batch 8, Adam 1e-4 (1e-3
diverged on this detector), one CPU thread::

    python tools/bench_finetune.py                       # both bundled models (~40 min)
    python tools/bench_finetune.py --models fashion_vgg_wide --settings ratio:0.25 --budget 120
    python tools/bench_finetune.py --nudenet --models ""
    python tools/bench_finetune.py --models fashion_cnn --settings ratio:0.3 --iterative   # one shot vs iterative
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

from tools.bench_calibration import CALIB, DATA_DIR, MODELS, accuracy, rank_config, speedups  # noqa: E402
from tools.train_fashion_mnist import load_split  # noqa: E402

SETTINGS = ["ratio:0.25", "ratio:0.2", "ratio:0.15"]
FINETUNE_NPZ = ROOT / "out" / "fashion_mnist_finetune.npz"


def finetune_set(count: int) -> Path:
    """``count`` train images not in the calibration set, normalised like the bundled ones (written once)."""
    path = FINETUNE_NPZ.with_name(f"fashion_mnist_finetune_{count}.npz")
    if path.exists():
        return path
    x, y = load_split(DATA_DIR, "train")
    calib = set(np.load(CALIB)["indices"].tolist())
    rest = np.array([i for i in range(len(x)) if i not in calib])
    pick = np.sort(np.random.default_rng(1).choice(rest, size=count, replace=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, input=x[pick], labels=y[pick], indices=pick)
    return path


def run_bundled(args, x, y) -> list[dict]:
    import onnx

    from onnxfactor import CompressConfig, calibrate, compress
    from onnxfactor.config import CalibrationConfig, FinetuneConfig

    data = finetune_set(args.train_images)
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        path = MODELS / f"{name}.onnx"
        original = onnx.load(str(path))
        base = accuracy(original, x, y)
        stats = calibrate(path, CALIB, config=CompressConfig(exclude=("/0/Conv",)))
        print(f"{name}: original {base:.2%}", flush=True)
        for setting in args.settings.split(","):
            config = CompressConfig(ranks=rank_config(setting), exclude=("/0/Conv",), calibration=CalibrationConfig())
            corrected, report = compress(path, config=config, calibration=stats)
            row = {"model": name, "setting": setting, "original_accuracy": base, "conv_macs_ratio": report.totals.conv_macs_ratio,
                   "corrected_accuracy": accuracy(corrected, x, y)}
            # 20 steps first, to know how many epochs the budget allows
            t = time.perf_counter()
            _, probe = compress(path, config=config, calibration=stats, finetune_data=data,
                                finetune=FinetuneConfig(steps=20, threads=1, lr=args.lr))
            steps_per_epoch = -(-args.train_images // 64)
            epoch_s = probe.finetune["per_epoch"][0]["seconds"] / 20 * steps_per_epoch  # the loop, not the set-up
            epochs = max(1, min(args.max_epochs, int(args.budget // max(epoch_s, 1e-9))))
            tuned, r1 = compress(path, config=config, calibration=stats, finetune_data=data,
                                 finetune=FinetuneConfig(epochs=epochs, threads=1, lr=args.lr))
            epoch_s = r1.finetune["per_epoch"][0]["seconds"]
            row.update(epochs=epochs, finetune_seconds=r1.finetune["seconds"], seconds_per_epoch=epoch_s,
                       peak_rss_mb=r1.finetune["peak_rss_mb"], accuracy=accuracy(tuned, x, y),
                       applied=r1.finetune.get("applied"), held_out_loss=[r1.finetune.get("held_out_loss_before"),
                                                                          r1.finetune.get("held_out_loss_after")],
                       latency=speedups(original, tuned, x, args.runs), wall=round(time.perf_counter() - t, 1))
            if args.iterative:  # the same total fine-tuning, in stages of --stage-size Convs
                stages = -(-5 // args.stage_size)  # 5 decomposed convs in both models
                it, ri = compress(path, config=config, calibration=CALIB, finetune_data=data,
                                  finetune=FinetuneConfig(epochs=epochs / stages, threads=1, lr=args.lr, stage_size=args.stage_size))
                row["iterative"] = {"stage_size": args.stage_size, "stages": stages, "epochs_per_stage": epochs / stages,
                                    "conv_macs_ratio": ri.totals.conv_macs_ratio, "finetune_seconds": ri.finetune["seconds"],
                                    "accuracy": accuracy(it, x, y), "latency": speedups(original, it, x, args.runs)}
            rows.append(row)
            lat = row["latency"]
            print(f"  {setting:11s} MACs {row['conv_macs_ratio']:6.2f}x  corrected {row['corrected_accuracy']:.2%}  "
                  f"fine-tuned ({epochs} epochs, {row['finetune_seconds']:.0f} s) {row['accuracy']:.2%}  "
                  f"speedup b1 {lat['batch1']['speedup']:.2f}x b64 {lat['batch64']['speedup']:.2f}x"
                  f"  held-out loss {row['held_out_loss'][0]:.4g} -> {row['held_out_loss'][1]:.4g}"
                  + ("" if row["applied"] else " (not applied)"), flush=True)
            if "iterative" in row:
                it = row["iterative"]
                print(f"  {'':11s} iterative ({it['stages']} stages x {it['epochs_per_stage']:.2f} epochs, {it['finetune_seconds']:.0f} s): "
                      f"MACs {it['conv_macs_ratio']:.2f}x {it['accuracy']:.2%}  speedup b1 {it['latency']['batch1']['speedup']:.2f}x", flush=True)
        ok = [r for r in rows if r["model"] == name and round(r["original_accuracy"] - r["accuracy"], 6) <= 0.005]  # 50 of 10 000 is 0.5 point
        best = max(ok, key=lambda r: r["conv_macs_ratio"], default=None)
        print(f"  largest cut within 0.5 point after <= {args.budget:.0f} s of fine-tuning: "
              + ("none" if best is None else f"{best['conv_macs_ratio']:.2f}x ({best['setting']}, {best['accuracy']:.2%})"), flush=True)
    return rows


def run_nudenet(args) -> dict:
    import os

    os.environ.setdefault("ONNXFACTOR_CALIB_COUNT", "256")
    from onnxfactor import CompressConfig, RankConfig, compress
    from onnxfactor.config import CalibrationConfig, FinetuneConfig
    from tools import calibration_sets, model_zoo

    feeds = list(calibration_sets.nudenet())  # one image per feed: the distillation joins them into batches of 8
    config = CompressConfig(ranks=RankConfig(policy="error", target_error=0.1), calibration=CalibrationConfig(samples=len(feeds)))
    _, report = compress(model_zoo.nudenet_320n(), config=config, calibration=feeds,
                         finetune=FinetuneConfig(epochs=1, threads=1, batch_size=8, lr=1e-4))
    f = report.finetune
    out = {"samples": len(feeds), "conv_macs_ratio": report.totals.conv_macs_ratio, "steps": f["steps"], "seconds_per_epoch": f["per_epoch"][0]["seconds"],
           "peak_rss_mb": f["peak_rss_mb"], "trainable_parameters": f["parameters"], "loss": [f["loss_first"], f["loss_last"]]}
    print("nudenet 320n fine-tuning:", out, flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="fashion_cnn,fashion_vgg_wide")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--budget", type=float, default=300.0, help="seconds of fine-tuning per model (default 300)")
    p.add_argument("--max-epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--iterative", action="store_true", help="also the iterative mode, same total fine-tuning")
    p.add_argument("--stage-size", type=int, default=2)
    p.add_argument("--nudenet", action="store_true")
    p.add_argument("--json", type=Path, default=ROOT / "out" / "bench_finetune.json")
    args = p.parse_args(argv)
    x, y = load_split(DATA_DIR, "test")
    result = {"bundled": run_bundled(args, x, y) if args.models else []}
    if args.nudenet:
        result["nudenet"] = run_nudenet(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
