"""Every decomposition method on real models: cost, reconstruction and output error, accuracy, fit time.

    python tools/bench_methods.py [--models fashion_vgg_wide,nudenet_320n] [--methods tucker2,cp3,cp4,tucker3,auto]
                                  [--ranks vbmf|weakened] [--weaken 0.6] [--out out/bench_methods.json]

One row per (model, method), MAC-only decisions (no latency measurement: see tools/bench.py for
speed): parameter and conv-MAC ratios, mean and max relative reconstruction error over the
decomposed layers, layers that fell back to Tucker-2, worst output relative L2 error against the
original on the same inputs (the bundled model's 1000 real test images; seeded random images for
nudenet), top-1 accuracy where labels exist, and the decomposition time (CPU seconds, one BLAS
thread). Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

DATA = ROOT / "models" / "fashion_mnist_test.npz"


def models() -> dict[str, tuple[Path, dict, Path | None, tuple[str, ...]]]:
    """name -> (path, input shapes, validation data, excluded nodes)."""
    from tools import model_zoo

    return {
        # the first conv has 1 input channel: cutting it saves ~0.4 % of MACs and costs accuracy
        "fashion_vgg_wide": (ROOT / "models" / "fashion_vgg_wide.onnx", {}, DATA, ("/0/Conv",)),
        "nudenet_320n": (model_zoo.nudenet_320n(), {}, None, ()),
    }


def run(name: str, method: str, policy: str, weaken: float) -> dict:
    from onnxfactor import compress, validate
    from onnxfactor.config import CompressConfig, RankConfig
    from onnxfactor.validation.run import ValidationOptions

    path, shapes, data, exclude = models()[name]
    config = CompressConfig(ranks=RankConfig(policy=policy, weaken=weaken), method=method, exclude=exclude)
    t = time.process_time()
    model, report = compress(path, config=config, input_shapes=shapes)
    cpu = time.process_time() - t
    result = validate(path, model, options=ValidationOptions(data=data, max_samples=None if data else 8, latency_runs=0), input_shapes=shapes)
    errors = [layer.rel_reconstruction_error for layer in report.decomposed]
    methods: dict[str, int] = {}
    for layer in report.decomposed:
        methods[layer.method] = methods.get(layer.method, 0) + 1
    return {
        "model": name,
        "method": method,
        "policy": policy if policy != "weakened" else f"weakened {weaken:g}",
        "decomposed": len(report.decomposed),
        "candidates": len(report.layers),
        "fallbacks": sum(1 for layer in report.decomposed if layer.fallback),
        "chains": methods,
        "params_ratio": report.totals.model_params_ratio,
        "conv_macs_ratio": report.totals.conv_macs_ratio,
        "mean_rel_reconstruction_error": sum(errors) / len(errors) if errors else None,
        "max_rel_reconstruction_error": max(errors) if errors else None,
        "worst_output_rel_l2": result.worst_rel_l2,
        "accuracy_original": result.accuracy_original,
        "accuracy_compressed": result.accuracy_compressed,
        "decompose_cpu_s": cpu,
        "decompose_wall_s": report.timings.get("decompose"),
    }


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    header = ("| model | method | ranks | decomposed | fallbacks | params x | conv MACs x | mean / max rec. error | "
              "output rel L2 | accuracy | CPU s |")
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for r in rows:
        acc = "-" if r["accuracy_original"] is None else f"{r['accuracy_original']:.1%} -> {r['accuracy_compressed']:.1%}"
        chains = ", ".join(f"{k} {v}" for k, v in sorted(r["chains"].items())) if r["method"] == "auto" else ""
        lines.append(
            f"| {r['model']} | {r['method']}{' (' + chains + ')' if chains else ''} | {r['policy']} | {r['decomposed']}/{r['candidates']} | "
            f"{r['fallbacks']} | {_fmt(r['params_ratio'], '.2f')} | {_fmt(r['conv_macs_ratio'], '.2f')} | "
            f"{_fmt(r['mean_rel_reconstruction_error'], '.3f')} / {_fmt(r['max_rel_reconstruction_error'], '.3f')} | "
            f"{r['worst_output_rel_l2']:.3f} | {acc} | {r['decompose_cpu_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="fashion_vgg_wide,nudenet_320n")
    parser.add_argument("--methods", default="tucker2,cp3,cp4,tucker3,auto")
    parser.add_argument("--ranks", default="weakened", choices=["vbmf", "weakened"])
    parser.add_argument("--weaken", type=float, default=0.6)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench_methods.json")
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        for method in args.methods.split(","):
            rows.append(run(name, method, args.ranks, args.weaken))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    stamp = f"{time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(stamp)
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
