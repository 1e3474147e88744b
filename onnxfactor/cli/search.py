"""The ``search`` command: requirements in, the best model that meets them (or exit 7) out."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from onnxfactor.cli import options as opt
from onnxfactor.cli.render import Renderer


def parse_duration(text: str | None) -> float | None:
    """``90``, ``90s``, ``20m``, ``1.5h`` -> seconds (one-line UsageError otherwise)."""
    from onnxfactor.errors import UsageError

    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise UsageError(f"--time-budget {text!r} is not a duration such as 90s, 20m or 1.5h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _floats(text: str, flag: str) -> tuple[float, ...]:
    from onnxfactor.errors import UsageError

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise UsageError(f"{flag} fractions must be in (0, 1], got {text!r}")
    return values


def search(
    input_model: opt.InputModel,
    output_model: Path = typer.Argument(..., help="Where to write the chosen model (atomically, after checks).", show_default=False),
    calibration: opt.Calibration = None,
    calibration_samples: opt.CalibrationSamples = None,
    data: opt.Data = None,
    max_samples: opt.MaxSamples = None,
    max_accuracy_drop: Annotated[Optional[float], typer.Option("--max-accuracy-drop", metavar="PTS", help="Requirement: top-1 accuracy on --data (labels) at most PTS points below the original's.", show_default=False, min=0.0)] = None,
    min_agreement: Annotated[Optional[float], typer.Option("--min-agreement", help="Requirement: agreement with the original on --data at least this: the --metric score when given, else top-1 agreement.", show_default=False, min=0.0, max=1.0)] = None,
    metric: opt.Metric = None,
    max_rel_error: Annotated[Optional[float], typer.Option("--max-rel-error", help="Requirement: every output's relative L2 error on --data at most this.", show_default=False, min=0.0)] = None,
    max_weight_mb: Annotated[Optional[float], typer.Option("--max-weight-mb", help="Requirement: initializer bytes at most this (10^6 bytes).", show_default=False, min=0.0)] = None,
    max_params: Annotated[Optional[int], typer.Option("--max-params", help="Requirement: model parameters at most this.", show_default=False, min=1)] = None,
    max_macs: Annotated[Optional[int], typer.Option("--max-macs", help="Requirement: conv (and, with --include-linear, linear) MACs per sample at most this.", show_default=False, min=1)] = None,
    target_speedup: Annotated[Optional[float], typer.Option("--target-speedup", help="Requirement: measured end-to-end speedup at least this.", show_default=False, min=0.0)] = None,
    max_latency_ms: Annotated[Optional[float], typer.Option("--max-latency-ms", help="Requirement: measured latency of the first --data batch at most this.", show_default=False, min=0.0)] = None,
    objective: Annotated[opt.ObjectiveName, typer.Option("--objective", help="What the winner minimises among candidates meeting every requirement.")] = opt.ObjectiveName.latency,
    strategy: Annotated[opt.StrategyName, typer.Option("--strategy", help="allocate: per-layer ranks from sensitivity curves and a Pareto front; grid: every global setting.")] = opt.StrategyName.allocate,
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated methods to search (tucker2, cp3, cp4, tucker3); with several, allocate picks a method per layer, grid tries each.")] = "tucker2",
    fractions: Annotated[Optional[str], typer.Option("--fractions", help="Comma-separated rank fractions of the sensitivity curves and the grid.", show_default=False)] = None,
    round_to: Annotated[Optional[int], typer.Option("--round-to", help="allocate: round ranks up to a multiple of this (1 = off). Default: 8 with --objective latency (measured faster), 1 with macs/params.", show_default=False, min=1)] = None,
    layer_timing: Annotated[bool, typer.Option("--layer-timing", help="allocate: order the front by each layer's chain timed against its Conv in ONNX Runtime (summed ms) instead of MACs.")] = False,
    timing_cache: opt.TimingCache = None,
    sensitivity: Annotated[opt.SensitivityName, typer.Option("--sensitivity", help="allocate: each option's loss from its layer's own output error (layer) or from the network's worst output error (per channel of N x C x ... outputs) with only that layer decomposed, on calibration samples (network; slower).")] = opt.SensitivityName.layer,
    sensitivity_samples: Annotated[int, typer.Option("--sensitivity-samples", help="With --sensitivity network: calibration samples each option is judged on (the first cached batches holding at least this many).", min=1)] = 32,
    jobs: Annotated[Optional[int], typer.Option("--jobs", help="Candidates evaluated at once in a local process pool (default: the cores, at most 4).", show_default=False, min=1)] = None,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="Evaluate candidates as Ray tasks: auto, ray://host:port, or local ([ray] extra).", show_default=False)] = None,
    cache: Annotated[Optional[Path], typer.Option("--cache", help="Folder of evaluated candidates (content-hashed): resumes and reuses.", show_default=False)] = None,
    time_budget: Annotated[Optional[str], typer.Option("--time-budget", help="Stop evaluating after this long (90s, 20m, 1h).", show_default=False)] = None,
    max_evaluations: Annotated[int, typer.Option("--max-evaluations", help="allocate: at most this many candidates per method.", min=1)] = 16,
    finetune: opt.Finetune = False,
    epochs: opt.Epochs = 1.0,
    search_steps: Annotated[int, typer.Option("--search-steps", help="With --finetune: the brief fine-tuning of every candidate, in steps (0 = none).", min=0)] = 0,
    lr: opt.Lr = 1e-3,
    batch_size: opt.BatchSize = 64,
    include_linear: Annotated[bool, typer.Option("--include-linear", help="Fully connected layers (Gemm / MatMul with a constant weight) are searched too.")] = False,
    fold_batchnorm: opt.FoldBatchnorm = False,
    correction_passes: opt.CorrectionPasses = 8,
    node: opt.Nodes = None,
    exclude: opt.Exclude = None,
    input_shape: opt.InputShapes = None,
    image_size: opt.ImageSize = None,
    resize: opt.Resize = opt.ResizeMode.stretch,
    scale: opt.Scale = 1 / 255,
    mean: opt.Mean = None,
    std: opt.Std = None,
    channel_order: opt.ChannelOrder = opt.ChannelOrderName.rgb,
    layout: opt.Layout = None,
    provider: opt.Provider = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="ONNX Runtime threads per candidate (default: cores // jobs).", show_default=False, min=1)] = None,
    latency_runs: opt.LatencyRuns = 30,
    report: opt.ReportPath = None,
    plots: Annotated[Optional[Path], typer.Option("--plots", help="Write the search's figures into this folder ([plot] extra).", show_default=False)] = None,
    write_best: Annotated[bool, typer.Option("--write-best", help="Without a feasible candidate, write the closest one anyway (still exit 7).")] = False,
    allow_overlap: opt.AllowOverlap = False,
    quiet: opt.Quiet = False,
) -> None:
    """Search per-layer ranks (or global settings) for the best model meeting the requirements; exit 7 if none does."""
    import dataclasses

    from onnxfactor.cli.commands import _calibration_config, _finetune_config, _metric, _shapes, image_spec
    from onnxfactor.config import CompressConfig
    from onnxfactor.errors import UsageError
    from onnxfactor.validation.run import ValidationOptions
    from onnxfactor.search import Constraints, SearchConfig
    from onnxfactor.search.output import search_file
    from onnxfactor.search.runner import describe
    from onnxfactor.search.space import FRACTIONS

    if calibration is None:
        raise UsageError("the search fits every candidate to calibration data: give --calibration DATA")
    if data is None:
        raise UsageError("the search measures every candidate on held-out data: give --data HELD_OUT")
    images = image_spec(image_size, resize, scale, mean, std, channel_order, layout)
    constraints = Constraints(max_accuracy_drop=max_accuracy_drop, min_agreement=min_agreement, max_rel_error=max_rel_error,
                              max_weight_mb=max_weight_mb, max_params=max_params, max_macs=max_macs,
                              target_speedup=target_speedup, max_latency_ms=max_latency_ms)
    if not constraints.to_dict():
        raise UsageError("give at least one requirement (--max-accuracy-drop, --min-agreement, --max-rel-error, --max-weight-mb, "
                         "--max-params, --max-macs, --target-speedup or --max-latency-ms)")
    from onnxfactor.methods import METHODS

    chosen = tuple(m.strip() for m in methods.split(",") if m.strip())
    unknown = [m for m in chosen if m not in METHODS]
    if not chosen or unknown:
        raise UsageError(f"unknown method {', '.join(unknown) or methods!r} in --methods; choose from {', '.join(METHODS)}")
    config = SearchConfig(constraints=constraints, objective=objective.value, strategy=strategy.value, methods=chosen,
                          fractions=_floats(fractions, "--fractions") if fractions else FRACTIONS, round_to=round_to,
                          jobs=jobs, ray_address=ray_address, cache=cache, time_budget=parse_duration(time_budget),
                          max_evaluations=max_evaluations, latency_runs=latency_runs, threads=threads,
                          layer_timing=layer_timing, timing_cache=timing_cache, sensitivity=sensitivity.value,
                          sensitivity_samples=sensitivity_samples)
    base = dataclasses.replace(CompressConfig(nodes=tuple(node or ()), exclude=tuple(exclude or ()), include_linear=include_linear,
                                                fold_batchnorm=fold_batchnorm),
                               calibration=_calibration_config(calibration_samples, "data", True, 0, 1024.0, provider,
                                                                               correction_passes))
    held_out = ValidationOptions(data=data, images=images, max_samples=max_samples, provider=provider, metric=_metric(metric))
    full = _finetune_config(epochs, None, lr, batch_size, None, "factors", False, 0, False) if finetune else None
    brief = dataclasses.replace(full, steps=search_steps) if finetune and search_steps else None
    render = Renderer(quiet=quiet)
    with render.progress("searching") as progress:
        result = search_file(input_model, output_model, calibration, held_out, config=config, base=base, images=images,
                             input_shapes=_shapes(input_shape), report_path=report, plots=plots, write_best=write_best,
                             finetune=full, brief_finetune=brief, progress=progress, allow_overlap=allow_overlap)
    out = result["output"]
    winner = result["winner"]
    v = out.get("validation") or {}
    acc = v.get("accuracy_compressed")
    render.console.print(
        f"searched {len(result['candidates'])} candidates in {result['seconds']['total']:.0f} s"
        f"{' (' + str(result['cache_hits']) + ' from the cache)' if result['cache_hits'] else ''}; chosen: {describe(winner['spec'])}: "
        f"conv MACs {out['conv_macs_ratio'] or 0:.2f}x, params {out['model_params_ratio'] or 0:.2f}x"
        + (f", accuracy {acc:.2%} (original {v.get('accuracy_original'):.2%})" if acc is not None else "")
        + (f", measured {v['speedup']:.2f}x" if v.get("speedup") else ""))
    render.console.print(f"wrote {out['path']}")
