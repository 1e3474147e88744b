"""Compression cost on real models: wall time and peak memory of `onnxfactor compress`.

Each model is compressed in a fresh subprocess (so peak RSS is its own), with the CLI's defaults
(VBMF ranks, one BLAS thread), with and without the ONNX Runtime validation step. Prints a
markdown table and writes JSON.

    python tools/bench_compress.py [--out out/bench_compress.json] [--models resnet50,nudenet_320n,...]

Peak memory is reported as (peak RSS - RSS after imports) / model file size: the issue's target
for a ResNet-50-size model is <= 2.5x, and <= 5 s wall on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CACHE = ROOT / "out" / "bench"


def _light_random(name: str) -> Path:
    """The onnx wheel's light_<name> model with random structured weights, written once to out/bench/."""
    from tools import model_zoo

    target = CACHE / f"light_{name}_random.onnx"
    if not target.exists():
        import onnx

        from onnxfactor import io

        loaded = io.load_model(model_zoo.light_model(name))
        model = io.restore_conventions(model_zoo.with_random_weights(loaded.model, seed=0), loaded.ir_version)
        CACHE.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(target))
    return target


def model_paths(names=None) -> dict[str, Path]:
    """Real model files by name (all of them by default); only the requested ones are located.

    Light models get random structured weights, written once to out/bench/.
    """
    from tools import model_zoo

    locate = {
        "fashion_cnn": lambda: ROOT / "models" / "fashion_cnn.onnx",
        "nudenet_320n": model_zoo.nudenet_320n,
        "ppocr_det": lambda: model_zoo.ppocr("det"),
        "ppocr_rec": lambda: model_zoo.ppocr("rec"),
        "light_resnet50": lambda: _light_random("resnet50"),
        "light_vgg19": lambda: _light_random("vgg19"),
    }
    names = list(locate) if names is None else list(names)
    unknown = [n for n in names if n not in locate]
    if unknown:
        raise KeyError(f"unknown model {', '.join(unknown)}; choose from {', '.join(locate)}")
    return {name: locate[name]() for name in names}


SHAPES = {"ppocr_det": ["x=1x3x640x640"], "ppocr_rec": ["x=1x3x48x320"]}


def _status_kb(field: str) -> int:
    """VmRSS / VmHWM of this process from /proc (ru_maxrss would include the parent's peak:
    Linux carries it across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_one(model: str, path: str, validate: bool) -> dict:
    """Runs inside the child process: compress one model, report wall time and peak RSS."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import onnxfactor.cli  # noqa: F401  (pins BLAS threads like the CLI does)
    from onnxfactor.pipeline import compress_file
    from onnxfactor.validation.run import ValidationOptions
    from onnxfactor.validation.inputs import parse_input_shapes

    import onnx, onnxruntime, onnx_graphsurgeon, numpy  # noqa: E401,F401  (imports outside the timing)

    base_kb = _status_kb("VmRSS")
    out = CACHE / f"{model}_compressed.onnx"
    t = time.perf_counter()
    report = compress_file(
        path, out, input_shapes=parse_input_shapes(SHAPES.get(model, [])),
        validation=ValidationOptions(latency_runs=0) if validate else None,
    )
    wall = time.perf_counter() - t
    peak_kb = _status_kb("VmHWM")
    size = Path(path).stat().st_size
    return {
        "model": model,
        "validate": validate,
        "wall_s": wall,
        "timings": report.timings,
        "conv_layers": len(report.layers),
        "decomposed": len(report.decomposed),
        "model_mb": size / 1e6,
        "peak_rss_mb": peak_kb / 1e3,
        "rss_after_imports_mb": base_kb / 1e3,
        "peak_over_model": (peak_kb - base_kb) * 1e3 / size,
        "params_ratio": report.totals.model_params_ratio,
        "conv_macs_ratio": report.totals.conv_macs_ratio,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench_compress.json")
    parser.add_argument("--models", default="", help="comma-separated subset")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "PATH", "VALIDATE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.one[2] == "1")))
        return
    paths = model_paths()
    wanted = [m for m in args.models.split(",") if m] or list(paths)
    rows = []
    for model in wanted:
        for validate in (False, True):
            proc = subprocess.run(
                [sys.executable, __file__, "--one", model, str(paths[model]), "1" if validate else "0"],
                capture_output=True, text=True, check=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
            )
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    header = "| model | size MB | Conv | decomposed | params x | conv MACs x | validate | wall s | peak RSS MB | (peak - base) / size |"
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for r in rows:
        macs = "-" if r["conv_macs_ratio"] is None else f"{r['conv_macs_ratio']:.2f}"
        lines.append(
            f"| {r['model']} | {r['model_mb']:.1f} | {r['conv_layers']} | {r['decomposed']} | {r['params_ratio']:.2f} | {macs} | "
            f"{'yes' if r['validate'] else 'no'} | {r['wall_s']:.2f} | {r['peak_rss_mb']:.0f} | {r['peak_over_model']:.2f} |"
        )
    table = "\n".join(lines)
    print(f"{time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "cpus": os.cpu_count(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
