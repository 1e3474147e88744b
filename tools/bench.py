"""Benchmark suite (issue 3): compression, output error, accuracy and ONNX Runtime CPU latency on real models.

One row per model and selection mode. ``measured`` decides with ONNX Runtime timings
(``CompressConfig(latency=LatencyConfig(...))``: each decomposed layer is kept only if it runs
faster, then the whole model is guarded end to end); ``macs`` decides by MAC and parameter counts
alone (``latency=None``), so the two rows show what measuring changes. Each row is computed in a
fresh subprocess, so its peak memory is its own:

* params x, conv MACs x: before / after (model parameters; Conv MACs at the analysed input shapes);
* ORT CPU latency of the original and the compressed model, median and p10-p90 over ``--runs``
  runs interleaved A, B, A, B (``ValidationOptions(latency_runs=...)``, 5 warm-up runs each), with
  ``--threads`` intra-op threads (default 1), and speedup = ratio of the medians;
* worst relative L2 error of the outputs, and top-1 accuracy before -> after where labels exist
  (the bundled Fashion-MNIST model, 1000 real test images);
* compress wall time (``compress_file`` without validation: load, decompose, latency selection,
  write, checker and ORT load) and its peak RSS (VmHWM, read before the validation runs);
* Conv layers decomposed / candidates, and in ``measured`` mode the layers kept because they
  measured slower and those rolled back by the end-to-end guard.

Models: the bundled ``fashion_vgg_wide`` (validated on ``models/fashion_mnist_test.npz``, its
first conv ``/0/Conv`` excluded as in ``make demo``; analysed and timed at batch 64, the
validation's batch), nudenet 320n, PP-OCRv4 det and rec, and the onnx wheel's light ResNet-50 and
VGG-19 with random structured weights (see :mod:`tools.bench_compress`); ``fashion_cnn`` on request.
The others are validated on seeded random inputs at batch 1.

With ``--clients``, two more rows per mode run the compressed models inside their real engines
(:mod:`tools.clients`): RapidOCR (PP-OCRv4 det + rec: text and box agreement) and NudeNet's
detector (box agreement), with the end-to-end time ratio of the engines' calls.

    python tools/bench.py [--models fashion_vgg_wide,nudenet_320n] [--modes measured,macs | --no-latency]
                          [--preset default|vbmf] [--runs 100] [--threads 1] [--clients] [--out out/bench.json]

Writes JSON (``--out``) and a markdown table next to it (``.md``), and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `tools` and `onnxfactor` importable
    sys.path.insert(0, str(ROOT))

from tools.bench_compress import CACHE, SHAPES, _status_kb, model_paths

MODELS = ("fashion_vgg_wide", "nudenet_320n", "ppocr_det", "ppocr_rec", "light_resnet50", "light_vgg19")
#: Bundled models: validated on real labelled images, first conv excluded (full rank 9, 0.4 % of the MACs).
BUNDLED = ("fashion_vgg_wide", "fashion_cnn")
DATA = ROOT / "models" / "fashion_mnist_test.npz"
FIRST_CONV = "/0/Conv"
#: The validation's batch size for an .npz file (``make_inputs``' default, which ``ValidationOptions``
#: does not expose): the bundled models are analysed and timed during selection at this batch too.
DATA_BATCH = 64
MODES = ("measured", "macs")
PRESETS = ("default", "vbmf")
#: What tools/clients.py must provide for the ``--clients`` rows.
CLIENT_API = ("compress_for_clients", "ocr_compare", "detector_compare", "load_reports", "original_models",
              "load_images", "OCR_IMAGES", "DETECTOR_IMAGES")
CLIENT_ROWS = ("rapidocr", "nudenet_detector")
# Layer reasons written by onnxfactor.speed (counted when present, never required).
SLOWER_REASON = "measured not faster"
ROLLBACK_REASON = "rolled back by the end-to-end guard"


# ------------------------------------------------------------------------------------------ setup


def make_config(preset: str, mode: str, threads: int, model: str | None = None):
    """The ``CompressConfig`` of a preset in a selection mode.

    ``default``: Tucker-2 at weakened VBMF ranks (w = 0.6, no rank rounding), as in ``make demo``.
    ``vbmf``: the CLI's defaults (plain VBMF ranks). ``measured`` adds a ``LatencyConfig`` timing
    on the CPU provider with ``threads`` intra-op threads; ``macs`` leaves latency off. The
    bundled models also exclude their first conv.
    """
    from onnxfactor.config import CompressConfig, LatencyConfig, RankConfig

    if preset not in PRESETS or mode not in MODES:
        raise ValueError(f"preset {preset!r} / mode {mode!r}: choose a preset of {PRESETS} and a mode of {MODES}")
    ranks = RankConfig(policy="weakened", weaken=0.6, round_to=1) if preset == "default" else RankConfig()
    latency = LatencyConfig(provider="cpu", threads=threads) if mode == "measured" else None
    exclude = (FIRST_CONV,) if model in BUNDLED else ()
    return CompressConfig(ranks=ranks, latency=latency, exclude=exclude)


def model_path(model: str) -> Path:
    """The model file (light models are created on first use, see :func:`tools.bench_compress.model_paths`)."""
    if model in BUNDLED:
        return ROOT / "models" / f"{model}.onnx"
    return model_paths([model])[model]


def input_shapes(model: str) -> list[str]:
    """``--input-shape`` strings of a model: bundled at the validation's batch, PP-OCR as in bench_compress."""
    if model in BUNDLED:
        return [f"input={DATA_BATCH}x1x28x28"]
    return SHAPES.get(model, [])


def machine_info(threads: int) -> dict:
    """Date, platform, CPU and ONNX Runtime version of this run."""
    import onnxruntime

    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines() if line.startswith("model name")), None)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "platform": platform.platform(),
        "cpu": cpu or platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "threads": threads,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


# -------------------------------------------------------------------------------- child processes


def run_one(model: str, path: str, mode: str, preset: str, runs: int, threads: int) -> dict:
    """Runs inside the child process: compress one model, then validate it; one row of the table."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # imported before the timing starts; onnxfactor.cli pins BLAS threads like the CLI does
    import numpy  # noqa: F401
    import onnx  # noqa: F401
    import onnx_graphsurgeon  # noqa: F401
    import onnxruntime  # noqa: F401

    import onnxfactor.cli  # noqa: F401
    from onnxfactor.pipeline import compress_file
    from onnxfactor.validation.run import ValidationOptions, validate
    from onnxfactor.validation.inputs import parse_input_shapes

    config = make_config(preset, mode, threads, model)
    shapes = parse_input_shapes(input_shapes(model))
    out = CACHE / f"{model}_{preset}_{mode}.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    base_kb = _status_kb("VmRSS")
    t = time.perf_counter()
    report = compress_file(path, out, config=config, input_shapes=shapes, validation=None)
    wall = time.perf_counter() - t
    peak_kb = _status_kb("VmHWM")  # before validation: its two sessions are not the compressor's memory

    options = ValidationOptions(data=DATA if model in BUNDLED else None, provider="cpu", threads=threads, latency_runs=runs)
    result = validate(path, out, options=options, input_shapes=shapes)
    reasons = [layer.reason or "" for layer in report.layers]
    totals = report.totals
    return {
        "model": model,
        "mode": mode,
        "preset": preset,
        "config": dataclasses.asdict(config),
        "input_shapes": report.input_shapes,
        "conv_candidates": len(report.layers),
        "decomposed": len(report.decomposed),
        "measured_slower": sum(SLOWER_REASON in r for r in reasons),
        "rolled_back": sum(ROLLBACK_REASON in r for r in reasons),
        "timed_layers": sum(bool(layer.latency and "speedup" in layer.latency) for layer in report.layers),
        "params_ratio": totals.model_params_ratio,
        "conv_macs_ratio": totals.conv_macs_ratio,
        "model_mb_before": (totals.model_bytes_before or 0) / 1e6,
        "model_mb_after": (totals.model_bytes_after or 0) / 1e6,
        "latency_original": dataclasses.asdict(result.latency_original) if result.latency_original else None,
        "latency_compressed": dataclasses.asdict(result.latency_compressed) if result.latency_compressed else None,
        "speedup": result.speedup,
        "selection_speedup": (report.speed or {}).get("speedup"),  # the guard's last end-to-end timing
        "worst_rel_l2": result.worst_rel_l2,
        "top1_agreement": next((o.top1_agreement for o in result.outputs if o.top1_agreement is not None), None),
        "accuracy_original": result.accuracy_original,
        "accuracy_compressed": result.accuracy_compressed,
        "validation_inputs": result.input_source,
        "providers": result.providers,
        "compress_s": wall,
        "timings": report.timings,
        "peak_rss_mb": peak_kb / 1e3,
        "rss_after_imports_mb": base_kb / 1e3,
        "warnings": report.warnings,
    }


def clients_module():
    """``(tools.clients, None)`` when it provides :data:`CLIENT_API`, else ``(None, why not)``."""
    if not (ROOT / "tools" / "clients.py").is_file():
        return None, "tools/clients.py does not exist"
    try:
        from tools import clients
    except ImportError as e:
        return None, f"tools/clients.py cannot be imported ({e})"
    missing = [name for name in CLIENT_API if not hasattr(clients, name)]
    if missing:
        return None, f"tools/clients.py lacks {', '.join(missing)}"
    return clients, None


def run_clients(mode: str, preset: str, threads: int, repeats: int) -> list[dict]:
    """Runs inside the child process: compress the clients' models, run both engines; two rows.

    The models are compressed with the preset's config (measured mode times with ``threads``);
    the engines then run with their own ONNX Runtime defaults.
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import onnxfactor.cli  # noqa: F401  (pins BLAS threads like the CLI does)

    clients, why = clients_module()
    if clients is None:
        raise RuntimeError(why)
    config = make_config(preset, mode, threads)
    originals = clients.original_models()
    t = time.perf_counter()
    compressed = clients.compress_for_clients(CACHE / "clients" / f"{preset}_{mode}", config)
    wall = time.perf_counter() - t
    reports = clients.load_reports(compressed)

    def counts(*names: str) -> dict:
        layers = [layer for n in names for layer in reports[n]["layers"]]
        reasons = [layer.get("reason") or "" for layer in layers]
        return {
            "models": {n: {"conv_macs_ratio": reports[n]["summary"]["conv_macs_ratio"],
                           "params_ratio": reports[n]["summary"]["model_params_ratio"]} for n in names},
            "conv_candidates": len(layers),
            "decomposed": sum(layer["status"] == "decomposed" for layer in layers),
            "measured_slower": sum(SLOWER_REASON in r for r in reasons),
            "rolled_back": sum(ROLLBACK_REASON in r for r in reasons),
        }

    ocr = clients.ocr_compare(originals["det"], compressed["det"], originals["rec"], compressed["rec"],
                              clients.load_images(clients.OCR_IMAGES), repeats=repeats)
    det = clients.detector_compare(originals["nudenet"], compressed["nudenet"],
                                   clients.load_images(clients.DETECTOR_IMAGES), repeats=repeats)
    common = {"mode": mode, "preset": preset, "repeats": repeats, "compress_s_all_three": wall}
    o, d = ocr["summary"], det["summary"]
    return [
        {"client": "rapidocr", **common, **counts("det", "rec"),
         "images": list(clients.OCR_IMAGES),
         "agreement": {"all_text_identical": o["all_text_identical"], "min_char_similarity": o["min_char_similarity"],
                       "min_box_iou": o["min_box_iou"], "lines_original": o["lines_original"]},
         "ms_original": o["ms_original"], "ms_compressed": o["ms_compressed"],
         "speedup": _ratio(o["ms_original"], o["ms_compressed"]), "per_image": ocr["images"]},
        {"client": "nudenet_detector", **common, **counts("nudenet"),
         "images": list(clients.DETECTOR_IMAGES),
         "agreement": {"all_classes_equal": d["all_classes_equal"], "matched": d["matched"],
                       "detections_original": d["detections_original"], "detections_compressed": d["detections_compressed"],
                       "min_iou": d["min_iou"], "max_score_diff": d["max_score_diff"]},
         "ms_original": d["ms_original"], "ms_compressed": d["ms_compressed"],
         "speedup": _ratio(d["ms_original"], d["ms_compressed"]), "per_image": det["images"]},
    ]


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


# ---------------------------------------------------------------------------------------- parent


def _child(args: list[str], label: str) -> tuple[list[dict] | None, str | None]:
    """Run this script with ``args`` in a fresh process: ``(its JSON rows, None)`` or ``(None, the error)``."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False,
                          env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"{label}: failed (exit {proc.returncode}):\n{proc.stderr.strip()}", file=sys.stderr)
        return None, tail
    rows = json.loads(lines[-1])
    return (rows if isinstance(rows, list) else [rows]), None


def _error_row(key: str, name: str, mode: str, preset: str, message: str) -> dict:
    return {key: name, "mode": mode, "preset": preset, "error": message}


def _fmt(value, spec: str = ".2f", default: str = "-") -> str:
    return default if value is None else format(value, spec)


def _latency_cell(stats: dict | None) -> str:
    if not stats:
        return "-"
    return f"{stats['median_ms']:.3g} ({stats['p10_ms']:.3g}-{stats['p90_ms']:.3g})"


def _accuracy_cell(row: dict) -> str:
    if row.get("accuracy_original") is None:
        return "-"
    return f"{100 * row['accuracy_original']:.1f} -> {100 * row['accuracy_compressed']:.1f} %"


def _compress_cell(row: dict) -> str:
    timing = row["timings"].get("latency")
    return f"{row['compress_s']:.2f}" + (f" ({timing:.1f} timing)" if timing is not None else "")


def _selection_cell(row: dict) -> str:
    if row["mode"] != "measured":
        return "-"
    return f"{row['measured_slower']} / {row['rolled_back']}"


MODEL_COLUMNS = ("model", "mode", "decomposed", "params x", "conv MACs x", "ORT ms original", "ORT ms compressed",
                 "speedup", "worst rel L2", "top-1 before -> after", "compress s", "peak RSS MB", "slower / rolled back")
CLIENT_COLUMNS = ("client", "mode", "decomposed", "agreement", "ms original", "ms compressed", "speedup", "slower / rolled back")


def _table(columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    """Markdown table lines; a short row (an error) is padded with empty cells."""
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    return lines + ["| " + " | ".join(row + [""] * (len(columns) - len(row))) + " |" for row in rows]


def _model_cells(r: dict) -> list[str]:
    if "error" in r:
        return [r["model"], r["mode"], f"error: {r['error']}"]
    return [
        r["model"], r["mode"], f"{r['decomposed']}/{r['conv_candidates']}", _fmt(r["params_ratio"]), _fmt(r["conv_macs_ratio"]),
        _latency_cell(r["latency_original"]), _latency_cell(r["latency_compressed"]), _fmt(r["speedup"]),
        _fmt(r["worst_rel_l2"], ".3g"), _accuracy_cell(r), _compress_cell(r), f"{r['peak_rss_mb']:.0f}", _selection_cell(r),
    ]


def _client_cells(r: dict) -> list[str]:
    if "error" in r:
        return [r["client"], r["mode"], f"error: {r['error']}"]
    a = r["agreement"]
    if r["client"] == "rapidocr":
        agreement = (f"text {'identical' if a['all_text_identical'] else 'DIFFERS'}, min char sim "
                     f"{_fmt(a['min_char_similarity'], '.3f')}, min box IoU {_fmt(a['min_box_iou'], '.3f')}")
    else:
        agreement = (f"{a['matched']} matched of {a['detections_original']}/{a['detections_compressed']}, classes "
                     f"{'equal' if a['all_classes_equal'] else 'DIFFER'}, min IoU {_fmt(a['min_iou'], '.3f')}")
    return [r["client"], r["mode"], f"{r['decomposed']}/{r['conv_candidates']}", agreement,
            f"{r['ms_original']:.0f}", f"{r['ms_compressed']:.0f}", _fmt(r["speedup"]), _selection_cell(r)]


def render(result: dict) -> str:
    """The markdown of a run: settings, the model table, and the client table if there is one."""
    m, s = result["machine"], result["settings"]
    load = ", ".join(f"{x:.2f}" for x in m["load_average"] or [])
    threads = f"{s['threads']} intra-op thread{'s' if s['threads'] != 1 else ''}"
    machine = (f"{m['platform']}; {m['cpu']}, {m['cpus']} CPUs (load average at start {load}); "
               f"Python {m['python']}, onnxruntime {m['onnxruntime']}.")
    settings = (f"Preset `{s['preset']}` ({s['preset_doc']}); modes: {', '.join(s['modes'])}. Latency: ORT CPU execution "
                f"provider, {threads}, {s['runs']} interleaved runs per model after 5 warm-up runs; median (p10-p90) in ms. "
                f"Bundled model: {DATA.name} (1000 images), timed at batch {DATA_BATCH}; others: random inputs at batch 1.")
    legend = ('"slower / rolled back": layers the measured selection kept undecomposed because their chain was not faster '
              "alone, and layers the end-to-end guard rolled back. Compress time and peak RSS exclude the validation; "
              '"timing" is the part the measured selection spent timing layers and models.')
    lines = [f"# onnxfactor benchmark, {m['date']}", "", machine, settings, "",
             *_table(MODEL_COLUMNS, [_model_cells(r) for r in result["rows"]]), "", legend]
    if result.get("clients") is not None:
        caption = ("Client engines (their own ONNX Runtime defaults; end-to-end time = sum over images of the median "
                   f"of {s['client_repeats']} interleaved calls):")
        lines += ["", caption, "", *_table(CLIENT_COLUMNS, [_client_cells(r) for r in result["clients"]])]
    return "\n".join(lines)


PRESET_DOCS = {
    "default": "Tucker-2, weakened VBMF ranks w = 0.6, no rank rounding, min reduction 10 %; bundled model without /0/Conv",
    "vbmf": "the CLI's defaults: Tucker-2 at VBMF ranks, min reduction 10 %; bundled model without /0/Conv",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated subset of {', '.join(MODELS)} (also: fashion_cnn)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="measured (ORT timings decide), macs (MAC counts decide), or both (default)")
    parser.add_argument("--no-latency", action="store_true", help="shorthand for --modes macs: MAC-only decisions")
    parser.add_argument("--preset", choices=PRESETS, default="default", help="; ".join(f"{k}: {v}" for k, v in PRESET_DOCS.items()).replace("%", "%%"))
    parser.add_argument("--runs", type=int, default=100, help="interleaved ORT latency runs per model in the validation")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads, for the selection and the validation")
    parser.add_argument("--clients", action="store_true", help="also run RapidOCR and NudeNet with the compressed models (tools/clients.py)")
    parser.add_argument("--client-repeats", type=int, default=5, help="timed engine calls per image and model (median)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench.json", help="JSON results; the markdown goes next to it (.md)")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "PATH", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--one-clients", metavar="MODE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(_jsonable(run_one(*args.one, args.preset, args.runs, args.threads))))
        return
    if args.one_clients:
        print(json.dumps(_jsonable(run_clients(args.one_clients, args.preset, args.threads, args.client_repeats))))
        return

    models = [m for m in args.models.split(",") if m]
    modes = ["macs"] if args.no_latency else [m for m in args.modes.split(",") if m]
    unknown = [m for m in models if m not in MODELS + BUNDLED] + [m for m in modes if m not in MODES]
    if unknown or args.runs < 1 or args.threads < 1:
        parser.error(f"unknown model or mode {', '.join(unknown)}" if unknown else "--runs and --threads must be >= 1")
    common = ["--preset", args.preset, "--runs", str(args.runs), "--threads", str(args.threads)]
    machine = machine_info(args.threads)  # before the runs: the load average describes the machine we got

    rows = []
    for model in models:
        try:
            path = model_path(model)
        except (FileNotFoundError, KeyError) as e:
            print(f"{model}: skipped ({e})", file=sys.stderr)
            rows += [_error_row("model", model, mode, args.preset, f"not found: {e}") for mode in modes]
            continue
        for mode in modes:
            print(f"{model} [{mode}] ...", file=sys.stderr, flush=True)
            got, error = _child(["--one", model, str(path), mode, *common], f"{model} [{mode}]")
            rows += got or [_error_row("model", model, mode, args.preset, error)]

    client_rows = None
    if args.clients:
        _, why = clients_module()
        if why is not None:
            print(f"--clients: skipped, {why}", file=sys.stderr)
        else:
            client_rows = []
            for mode in modes:
                print(f"clients [{mode}] ...", file=sys.stderr, flush=True)
                got, error = _child(["--one-clients", mode, *common, "--client-repeats", str(args.client_repeats)], f"clients [{mode}]")
                client_rows += got or [_error_row("client", c, mode, args.preset, error) for c in CLIENT_ROWS]

    result = {
        "machine": machine,
        "settings": {"preset": args.preset, "preset_doc": PRESET_DOCS[args.preset], "modes": modes, "runs": args.runs,
                     "threads": args.threads, "provider": "CPUExecutionProvider", "client_repeats": args.client_repeats},
        "rows": rows,
        "clients": client_rows,
    }
    markdown = render(result)
    print(markdown)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown + "\n")
    print(f"written {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)


def _jsonable(obj):
    from onnxfactor.report import to_jsonable  # non-finite floats, numpy scalars, paths

    return to_jsonable(obj)


if __name__ == "__main__":
    main()
