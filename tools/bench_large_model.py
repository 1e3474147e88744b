#!/usr/bin/env python3
"""A model larger than protobuf's 2 GiB: compressed, written with external data, checked, run.

Builds (never committed; under ``out/large/``) a stack of ``LAYERS`` Conv 3x3 layers of
``CHANNELS`` channels with Relu between them, whose weights -- Tucker-structured (multilinear
rank ``CHANNELS // 4``) plus 2 % noise, so that VBMF finds a rank -- exceed 2 GiB and are stored
as external data. Then, in a fresh process each:

1. ``onnxfactor compress big.onnx small.onnx --no-measure`` (validated on random inputs);
2. ``onnx.checker.check_model("small.onnx", full_check=True)`` by path and an ONNX Runtime run;

and prints wall time, peak RSS against the model size, the output's files::

    python tools/bench_large_model.py                    # 60 x 1024-channel layers: 2.26 GB
    python tools/bench_large_model.py --layers 8         # a small rehearsal (no 2 GiB)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHANNELS = 1024
LAYERS = 60


def build(path: Path, layers: int, channels: int, seed: int = 0) -> int:
    """Write the model with external data; returns the weight bytes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    r = channels // 4
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        core = rng.standard_normal((r, r, 3, 3)).astype(np.float32)
        u = np.linalg.qr(rng.standard_normal((channels, r)))[0].astype(np.float32)
        v = np.linalg.qr(rng.standard_normal((channels, r)))[0].astype(np.float32)
        w = np.einsum("abhw,oa,ib->oihw", core, u, v, optimize=True)
        w += 0.02 * np.linalg.norm(w) / np.sqrt(w.size) * rng.standard_normal(w.shape).astype(np.float32)
        w *= np.sqrt(2.0 / (channels * 9)) / w.std()  # He scale: activations stay finite through the stack
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        x = f"r{i}"
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 8, 8])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, channels, 8, 8])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data")
    return layers * channels * channels * 9 * 4


def check(path: Path) -> dict:
    import onnx
    import onnxruntime as ort

    t = time.perf_counter()
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": np.random.default_rng(1).standard_normal((1, CHANNELS, 8, 8)).astype(np.float32)})[0]
    return {"checker_and_run_s": round(time.perf_counter() - t, 1), "finite": bool(np.isfinite(y).all()),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=LAYERS)
    p.add_argument("--dir", type=Path, default=ROOT / "out" / "large")
    p.add_argument("--check", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.check:
        print(json.dumps(check(args.check)))
        return 0
    big, small = args.dir / "big.onnx", args.dir / "small.onnx"
    weight_bytes = build(big, args.layers, CHANNELS)
    model_bytes = big.stat().st_size + (args.dir / "big.onnx.data").stat().st_size
    print(f"built {big}: {args.layers} Conv, weights {weight_bytes / 1e9:.2f} GB (files {model_bytes / 1e9:.2f} GB)", flush=True)
    cmd = [sys.executable, "-c", "import resource, sys, time; from onnxfactor.cli.app import main; "
           "t = time.perf_counter()\ntry:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
           "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 'WALL', time.perf_counter() - t, 'EXIT', code)",
           "compress", str(big), str(small), "--no-measure", "--latency-runs", "3", "--report", str(args.dir / "report.json")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**__import__("os").environ, "OPENBLAS_NUM_THREADS": "1"})
    last = out.stdout.strip().splitlines()[-1].split()
    rss, wall, code = float(last[1]), float(last[3]), last[5]
    print(out.stdout.strip().splitlines()[-3] if len(out.stdout.strip().splitlines()) > 2 else "", out.stderr[-500:])
    files = sorted(p.name for p in args.dir.iterdir())
    checked = json.loads(subprocess.run([sys.executable, __file__, "--check", str(small)], capture_output=True, text=True,
                                        check=True, cwd=ROOT).stdout.strip().splitlines()[-1])
    report = json.loads((args.dir / "report.json").read_text())
    result = {"layers": args.layers, "model_gb": round(model_bytes / 1e9, 2), "exit": code, "compress_wall_s": round(wall, 1),
              "compress_peak_rss_gb": round(rss / 1024, 2), "peak_rss_over_model_size": round(rss * 2**20 / model_bytes, 2),
              "conv_macs_ratio": report["summary"]["conv_macs_ratio"], "output_files": files,
              "output_gb": round(sum((args.dir / f).stat().st_size for f in files if f.startswith("small")) / 1e9, 2),
              "worst_rel_l2": (report.get("validation") or {}).get("worst_rel_l2"), **checked}
    print(json.dumps(result, indent=1))
    (args.dir / "result.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
