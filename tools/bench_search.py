#!/usr/bin/env python3
"""Benchmark of ``onnxfactor search``: the searched model against every global setting, and wall times.

Bundled Fashion-MNIST models, calibration on the 1000 bundled *train* images; the search selects
on the first 5000 *test* images (``--data``) and the figures printed here are measured on the
other 5000, which no step of the search saw. For each model:

1. ``--strategy grid``: every global setting (ratio fractions and VBMF weakening, ranks rounded to
   1 and 8), each built and measured; the fastest that meets ``--max-accuracy-drop``;
2. ``--strategy allocate`` (the default): per-layer ranks under the same requirement;

then both winners and the original timed together (ONNX Runtime CPU, one thread, interleaved,
median, batch 1 and 64) and their accuracy on the unseen half. ``--parallel``: wall time of the
same allocation search with ``--jobs 1``, ``--jobs 2`` and on a local Ray instance (no cache)::

    python tools/bench_search.py                         # both models (~20 min)
    python tools/bench_search.py --models fashion_cnn --parallel
    python tools/bench_search.py --models "" --weight-cap 150   # light VGG-19, convs alone vs with FC layers
    python tools/bench_search.py --strategies allocate --layer-timing   # the front by measured layer time
    python tools/bench_search.py --strategies allocate --methods tucker2,cp3,tucker3   # a method per layer
    python tools/bench_search.py --strategies allocate --sensitivity layer,network    # per-option loss: layer vs network output

``--weight-cap MB``: the onnx wheel's light VGG-19 with random structured weights
(``tools/bench_compress.py``), calibration on 16 and selection on 8 *other* seeded random images
(the weights are not trained: there is no task to measure), requirement ``--max-weight-mb MB``
alone, searched once over the convs and once with ``--include-linear``; prints what each reaches
(the smallest model on its front) and the winner's measured figures.
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

from tools.bench_calibration import CALIB, DATA_DIR, MODELS, accuracy, speedups  # noqa: E402
from tools.train_fashion_mnist import load_split  # noqa: E402


def halves(out: Path):
    x, y = load_split(DATA_DIR, "test")
    select = out / "search_select_test5000.npz"
    if not select.exists():
        out.mkdir(parents=True, exist_ok=True)
        np.savez(select, input=x[:5000], labels=y[:5000])
    return select, x[5000:], y[5000:]


def run(model: Path, select: Path, strategy: str, drop: float, jobs: int, ray: str | None = None, cache=None, round_to: int = 8,
        layer_timing: bool = False, methods: tuple[str, ...] = ("tucker2",), sensitivity: str = "layer"):
    from onnxfactor.config import CalibrationConfig, CompressConfig
    from onnxfactor.validation.run import ValidationOptions
    from onnxfactor.search import Constraints, SearchConfig, search
    from onnxfactor.search.runner import describe

    base = CompressConfig(exclude=("/0/Conv",), calibration=CalibrationConfig())
    config = SearchConfig(constraints=Constraints(max_accuracy_drop=drop), strategy=strategy, jobs=jobs, ray_address=ray,
                          cache=cache, threads=1, latency_runs=30, round_to=round_to,
                          layer_timing=layer_timing and strategy == "allocate", methods=methods, sensitivity=sensitivity)
    t = time.perf_counter()
    result = search(model, CALIB, ValidationOptions(data=select), config=config, base=base)
    return result, time.perf_counter() - t, describe


def build(model: Path, spec: dict, stats):
    import tempfile

    from onnxfactor import compress
    from onnxfactor.config import CalibrationConfig, CompressConfig
    from onnxfactor.search.evaluate import config_for

    with tempfile.TemporaryDirectory() as tmp:
        config = config_for(spec, CompressConfig(exclude=("/0/Conv",), calibration=CalibrationConfig()), Path(tmp))
        return compress(model, config=config, calibration=stats)


def weight_cap(cap_mb: float, out: Path) -> dict:
    """light VGG-19 under ``--max-weight-mb cap_mb``: convs only vs with the fully connected layers."""
    from onnxfactor.config import CalibrationConfig, CompressConfig
    from onnxfactor.errors import ConstraintsNotMet
    from onnxfactor.validation.run import ValidationOptions
    from onnxfactor.search import Constraints, SearchConfig, search
    from onnxfactor.search.runner import describe
    from tools.bench_compress import model_paths

    model = model_paths(["light_vgg19"])["light_vgg19"]
    data = {}
    for name, n, seed in (("calib", 16, 0), ("select", 8, 1)):
        data[name] = out / f"vgg19_random_{name}.npz"
        if not data[name].exists():
            x = np.random.default_rng(seed).standard_normal((n, 3, 224, 224)).astype(np.float32)
            np.savez(data[name], **{"data_0": x})
    rows = {}
    for label, linear in (("convs only", False), ("with FC layers", True)):
        base = CompressConfig(include_linear=linear, calibration=CalibrationConfig(samples=16, correction_samples=8))
        config = SearchConfig(constraints=Constraints(max_weight_mb=cap_mb), fractions=(0.1, 0.25, 0.5), jobs=1, threads=2, round_to=1,
                              latency_runs=5, max_evaluations=4)
        t = time.perf_counter()
        try:
            result = search(model, data["calib"], ValidationOptions(data=data["select"], max_samples=8), config=config, base=base)
            w = result.winner
            rows[label] = {"feasible": w is not None, "seconds": round(time.perf_counter() - t, 1),
                           "smallest_on_front_mb": min((f.get("bytes", 0) for f in result.front), default=None),
                           "winner": None if w is None else {"spec": describe(w["spec"]), "weight_mb": w["weight_bytes"] / 1e6,
                                                             "params": w["params"], "params_original": w["params_original"],
                                                             "rel_error": w["rel_error"], "speedup": w["speedup"]}}
        except ConstraintsNotMet as e:
            rows[label] = {"feasible": False, "seconds": round(time.perf_counter() - t, 1), "message": str(e)}
        print(f"light VGG-19, --max-weight-mb {cap_mb:g}, {label}: {rows[label]}", flush=True)
    return rows


def main(argv=None) -> int:
    import onnx

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="fashion_cnn,fashion_vgg_wide")
    p.add_argument("--max-accuracy-drop", type=float, default=0.5)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--parallel", action="store_true")
    p.add_argument("--round-to", default="8", help="rank rounding of the allocation's curves (search's default with the latency objective); several (1,8): one allocate search each")
    p.add_argument("--strategies", default="grid,allocate")
    p.add_argument("--layer-timing", action="store_true", help="allocate by measured layer time (search --layer-timing)")
    p.add_argument("--weight-cap", type=float, default=None, metavar="MB", help="also light VGG-19 under --max-weight-mb MB")
    p.add_argument("--sensitivity", default="layer", help="search --sensitivity; several (layer,network): one allocate search each")
    p.add_argument("--methods", default="tucker2", help="search --methods (several: a method per layer)")
    p.add_argument("--json", type=Path, default=ROOT / "out" / "bench_search.json")
    args = p.parse_args(argv)
    methods = tuple(args.methods.split(","))
    select, x, y = halves(ROOT / "out")
    out = {"models": [], "parallel": None}
    if args.weight_cap is not None:
        out["weight_cap"] = {"cap_mb": args.weight_cap, "light_vgg19": weight_cap(args.weight_cap, ROOT / "out")}
    for name in [m for m in args.models.split(",") if m]:
        path = MODELS / f"{name}.onnx"
        original = onnx.load(str(path))
        row = {"model": name, "original_accuracy_unseen": accuracy(original, x, y)}
        roundings = [int(r) for r in str(args.round_to).split(",")]
        modes = args.sensitivity.split(",")
        runs = [(s, r, m) for s in args.strategies.split(",") for r in (roundings if s == "allocate" else roundings[:1])
                for m in (modes if s == "allocate" else modes[:1])]
        for strategy, round_to, mode in runs:
            result, wall, describe = run(path, select, strategy, args.max_accuracy_drop, args.jobs,
                                         cache=ROOT / "out" / "search_cache" / name, round_to=round_to,
                                         layer_timing=args.layer_timing, methods=methods, sensitivity=mode)
            w = result.winner
            entry = {"wall_seconds": round(wall, 1), "candidates": len(result.candidates),
                     "feasible": sum(not c["violations"] for c in result.candidates), "winner": None}
            if w is not None:
                model, report = build(path, w["spec"], result.statistics)
                entry["winner"] = {"spec": describe(w["spec"]), "conv_macs_ratio": report.totals.conv_macs_ratio,
                                   "accuracy_selection_half": w["accuracy"], "accuracy_unseen": accuracy(model, x, y),
                                   "latency": speedups(original, model, x, args.runs)}
            label = strategy if len(roundings) == 1 or strategy != "allocate" else f"allocate round-to {round_to}"
            if strategy == "allocate" and len(modes) > 1:
                label += f" {mode} sensitivity"
            row[label] = entry
            won = entry["winner"]
            print(f"{name} {label:8s}: {entry['candidates']} candidates ({entry['feasible']} feasible) in {wall:.0f} s; "
                  + ("none feasible" if won is None else
                     f"{won['spec']}: MACs {won['conv_macs_ratio']:.2f}x, accuracy unseen {won['accuracy_unseen']:.2%} "
                     f"(original {row['original_accuracy_unseen']:.2%}), speedup b1 {won['latency']['batch1']['speedup']:.2f}x "
                     f"b64 {won['latency']['batch64']['speedup']:.2f}x"), flush=True)
        out["models"].append(row)
    if args.parallel:
        name = args.models.split(",")[0]
        times = {}
        for label, jobs, ray in (("jobs 1", 1, None), ("jobs 2", 2, None), ("ray local (2 CPUs)", 2, "local")):
            _, wall, _ = run(MODELS / f"{name}.onnx", select, "allocate", args.max_accuracy_drop, jobs, ray)
            times[label] = round(wall, 1)
            print(f"{name} allocate search, {label}: {wall:.0f} s", flush=True)
            if ray:
                import ray as ray_module

                ray_module.shutdown()
        out["parallel"] = {"model": name, "wall_seconds": times}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
