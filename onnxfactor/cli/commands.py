"""The three commands. Each builds a config from its options, calls the library, renders the result."""

from __future__ import annotations

from pathlib import Path

import typer

from onnxfactor.cli import options as opt
from onnxfactor.cli.render import Renderer


def _configs(ranks, weaken, ratio, energy, target_error, rank_file, rank0, min_rank, round_to, min_reduction, in_min_channels, hooi, node, exclude, method="tucker2",
             include_linear=False, fold_batchnorm=False):
    from onnxfactor.config import CompressConfig, RankConfig

    policy = "file" if rank_file is not None else ranks.value
    rank_config = RankConfig(
        policy=policy, weaken=weaken, ratio=ratio, energy=energy, target_error=target_error, rank_file=rank_file,
        rank0=rank0.value, min_rank=min_rank, round_to=round_to,
    )
    return CompressConfig(
        ranks=rank_config, method=getattr(method, "value", method), min_reduction=min_reduction, in_mode_min_channels=in_min_channels,
        hooi_iters=hooi, nodes=tuple(node or ()), exclude=tuple(exclude or ()), include_linear=include_linear,
        fold_batchnorm=fold_batchnorm,
    )


def _shapes(input_shape):
    from onnxfactor.validation.inputs import parse_input_shapes

    return parse_input_shapes(input_shape or [])


def compress(
    input_model: opt.InputModel,
    output_model: Path = typer.Argument(..., help="Where to write the compressed model (atomically, after checks).", show_default=False),
    method: opt.Method = opt.MethodName.tucker2,
    ranks: opt.Policy = opt.RankPolicy.vbmf,
    weaken: opt.Weaken = 0.6,
    ratio: opt.Ratio = 0.5,
    energy: opt.Energy = 0.95,
    target_error: opt.TargetError = 0.3,
    rank_file: opt.RankFile = None,
    rank0: opt.Rank0 = opt.Rank0Rule.keep,
    min_rank: opt.MinRank = 1,
    round_to: opt.RoundTo = 1,
    min_reduction: opt.MinReduction = 0.1,
    in_min_channels: opt.InMinChannels = 4,
    hooi: opt.Hooi = 0,
    node: opt.Nodes = None,
    exclude: opt.Exclude = None,
    include_linear: opt.IncludeLinear = False,
    fold_batchnorm: opt.FoldBatchnorm = False,
    input_shape: opt.InputShapes = None,
    calibration: opt.Calibration = None,
    calibration_samples: opt.CalibrationSamples = None,
    fit: opt.Fit = opt.FitName.data,
    correct: opt.Correct = True,
    reconstruct: opt.Reconstruct = 0,
    correction_passes: opt.CorrectionPasses = 8,
    calibration_memory: opt.CalibrationMemory = 1024.0,
    finetune: opt.Finetune = False,
    iterative: opt.Iterative = False,
    stage_size: opt.StageSize = 2,
    epochs: opt.Epochs = 1.0,
    steps: opt.Steps = None,
    lr: opt.Lr = 1e-3,
    batch_size: opt.BatchSize = 64,
    device: opt.Device = None,
    train: opt.Train = opt.TrainName.factors,
    labels: opt.Labels = False,
    deterministic: opt.Deterministic = False,
    data: opt.Data = None,
    metric: opt.Metric = None,
    allow_overlap: opt.AllowOverlap = False,
    image_size: opt.ImageSize = None,
    resize: opt.Resize = opt.ResizeMode.stretch,
    scale: opt.Scale = 1 / 255,
    mean: opt.Mean = None,
    std: opt.Std = None,
    channel_order: opt.ChannelOrder = opt.ChannelOrderName.rgb,
    layout: opt.Layout = None,
    seed: opt.Seed = 0,
    max_samples: opt.MaxSamples = None,
    provider: opt.Provider = None,
    threads: opt.Threads = None,
    latency_runs: opt.LatencyRuns = 50,
    max_rel_error: opt.MaxRelError = None,
    measure: opt.Measure = True,
    speed_margin: opt.SpeedMargin = 0.05,
    rank_search: opt.RankSearch = True,
    allow_slower: opt.AllowSlower = False,
    timing_cache: opt.TimingCache = None,
    target_speedup: opt.TargetSpeedup = None,
    max_latency_ms: opt.MaxLatencyMs = None,
    no_validate: bool = typer.Option(False, "--no-validate", help="Skip the ONNX Runtime comparison (checker and load still run)."),
    external_data: bool = typer.Option(False, "--external-data", help="Write the weights to OUTPUT_MODEL.data (external data), "
                                       "as is done anyway when the input has external data or the output exceeds 2 GiB."),
    report: opt.ReportPath = None,
    quiet: opt.Quiet = False,
) -> None:
    """Decompose the Conv layers (with --include-linear also the fully connected ones) of INPUT_MODEL and write OUTPUT_MODEL,
    with a validation report."""
    import dataclasses

    from onnxfactor.config import LatencyConfig
    from onnxfactor.errors import UsageError
    from onnxfactor.pipeline import compress_file
    from onnxfactor.validation.run import ValidationOptions

    config = _configs(ranks, weaken, ratio, energy, target_error, rank_file, rank0, min_rank, round_to, min_reduction, in_min_channels, hooi, node, exclude, method,
                      include_linear=include_linear, fold_batchnorm=fold_batchnorm)
    if target_speedup is not None and max_latency_ms is not None:
        raise UsageError("give one latency budget: --target-speedup or --max-latency-ms, not both")
    if iterative and not finetune:
        raise UsageError("--iterative fine-tunes between stages: add --finetune (and --calibration DATA)")
    if not measure and (target_speedup is not None or max_latency_ms is not None):
        raise UsageError("a latency budget (--target-speedup / --max-latency-ms) needs measurements: drop --no-measure")
    if measure:
        config = dataclasses.replace(config, latency=LatencyConfig(
            margin=speed_margin, rank_search=rank_search, guard=True, allow_slower=allow_slower,
            target_speedup=target_speedup, max_latency_ms=max_latency_ms, provider=provider, threads=threads,
            timing_cache=timing_cache,
        ))
    config = dataclasses.replace(config, calibration=_calibration_config(calibration_samples, fit, correct, reconstruct, calibration_memory, provider,
                                                                         correction_passes))
    images = image_spec(image_size, resize, scale, mean, std, channel_order, layout)
    validation = None if no_validate else ValidationOptions(
        data=data, images=images, seed=seed, max_samples=max_samples, provider=provider, threads=threads,
        latency_runs=latency_runs, max_rel_error=max_rel_error, metric=_metric(metric),
    )
    render = Renderer(quiet=quiet)
    with render.progress("decomposing") as progress:
        result = compress_file(
            input_model, output_model, config=config, input_shapes=_shapes(input_shape),
            validation=validation, report_path=report, progress=progress,
            calibration=calibration, images=images, allow_overlap=allow_overlap, external_data=external_data,
            finetune=_finetune_config(epochs, steps, lr, batch_size, device, train, labels, seed, deterministic,
                                      stage_size=stage_size if iterative else None) if finetune else None,
        )
    render.compress_report(result)


def _metric(spec):
    """The ``--metric`` loaded now (a bad script fails before any long work), or None."""
    from onnxfactor.validation.metric import as_metric

    return as_metric(spec)


def _finetune_config(epochs, steps, lr, batch_size, device, train, labels, seed, deterministic, stage_size=None):
    from onnxfactor.config import FinetuneConfig

    return FinetuneConfig(epochs=epochs, steps=steps, lr=lr, batch_size=batch_size, device=getattr(device, "value", device),
                          train=getattr(train, "value", train), label_weight=1.0 if labels else 0.0, seed=seed,
                          deterministic=deterministic, threads=1, stage_size=stage_size)


def finetune(
    compressed_model: opt.InputModel,
    output_model: Path = typer.Argument(..., help="Where to write the fine-tuned model (atomically, after checks).", show_default=False),
    teacher: Path = typer.Option(..., "--teacher", help="The original model the compressed one was made from.", show_default=False),
    calibration: opt.Calibration = None,
    calibration_samples: opt.CalibrationSamples = None,
    epochs: opt.Epochs = 1.0,
    steps: opt.Steps = None,
    lr: opt.Lr = 1e-3,
    batch_size: opt.BatchSize = 64,
    device: opt.Device = None,
    train: opt.Train = opt.TrainName.factors,
    labels: opt.Labels = False,
    deterministic: opt.Deterministic = False,
    seed: opt.Seed = 0,
    data: opt.Data = None,
    metric: opt.Metric = None,
    allow_overlap: opt.AllowOverlap = False,
    image_size: opt.ImageSize = None,
    resize: opt.Resize = opt.ResizeMode.stretch,
    scale: opt.Scale = 1 / 255,
    mean: opt.Mean = None,
    std: opt.Std = None,
    channel_order: opt.ChannelOrder = opt.ChannelOrderName.rgb,
    layout: opt.Layout = None,
    provider: opt.Provider = None,
    threads: opt.Threads = None,
    latency_runs: opt.LatencyRuns = 50,
    no_validate: bool = typer.Option(False, "--no-validate", help="Skip the ONNX Runtime comparison with the teacher."),
    report: opt.ReportPath = None,
) -> None:
    """Fine-tune a compressed model by label-free distillation from its original (--teacher) on --calibration data."""
    from onnxfactor.errors import UsageError
    from onnxfactor.finetune.stage import finetune_file
    from onnxfactor.validation.run import ValidationOptions

    if calibration is None:
        raise UsageError("fine-tuning needs data: give --calibration DATA (an .npz, an image folder or script.py[:function])")
    images = image_spec(image_size, resize, scale, mean, std, channel_order, layout)
    validation = None if no_validate else ValidationOptions(data=data, images=images, seed=seed, provider=provider, threads=threads,
                                                            latency_runs=latency_runs, metric=_metric(metric))
    config = _finetune_config(epochs, steps, lr, batch_size, device, train, labels, seed, deterministic)
    render = Renderer()
    with render.progress("fine-tuning") as progress:
        result = finetune_file(compressed_model, output_model, teacher, calibration, config=config, images=images,
                               samples=calibration_samples, validation=validation, report_path=report, progress=progress,
                               allow_overlap=allow_overlap)
    render.finetune(result["finetune"])
    render.validation(result.get("validation"))
    render.console.print(f"wrote {result['output_path']}")


def _calibration_config(samples, fit, correct, reconstruct, memory, provider, passes=8):
    from onnxfactor.config import CalibrationConfig

    return CalibrationConfig(fit=getattr(fit, "value", fit), correct=correct, reconstruct_steps=reconstruct, samples=samples,
                             memory_mb=memory, provider=provider, stages=passes)


def analyze(
    input_model: opt.InputModel,
    method: opt.Method = opt.MethodName.tucker2,
    ranks: opt.Policy = opt.RankPolicy.vbmf,
    weaken: opt.Weaken = 0.6,
    ratio: opt.Ratio = 0.5,
    energy: opt.Energy = 0.95,
    target_error: opt.TargetError = 0.3,
    rank_file: opt.RankFile = None,
    rank0: opt.Rank0 = opt.Rank0Rule.keep,
    min_rank: opt.MinRank = 1,
    round_to: opt.RoundTo = 1,
    min_reduction: opt.MinReduction = 0.1,
    in_min_channels: opt.InMinChannels = 4,
    include_linear: opt.IncludeLinear = False,
    fold_batchnorm: opt.FoldBatchnorm = False,
    input_shape: opt.InputShapes = None,
    calibration: opt.Calibration = None,
    calibration_samples: opt.CalibrationSamples = None,
    fit: opt.Fit = opt.FitName.data,
    calibration_memory: opt.CalibrationMemory = 1024.0,
    image_size: opt.ImageSize = None,
    resize: opt.Resize = opt.ResizeMode.stretch,
    scale: opt.Scale = 1 / 255,
    mean: opt.Mean = None,
    std: opt.Std = None,
    channel_order: opt.ChannelOrder = opt.ChannelOrderName.rgb,
    layout: opt.Layout = None,
    provider: opt.Provider = None,
    report: opt.ReportPath = None,
) -> None:
    """Per layer: shapes, VBMF ranks and sigma^2, chosen ranks, predicted compression (with --calibration: the
    data-aware ranks and each layer's output error on the calibration data). Writes no model."""
    from onnxfactor.pipeline import analyze as run_analyze
    from onnxfactor.pipeline import check_output_path

    if report is not None:
        check_output_path(report, "report", protected={"input model": input_model})
    import dataclasses

    config = _configs(ranks, weaken, ratio, energy, target_error, rank_file, rank0, min_rank, round_to, min_reduction, in_min_channels, 0, None, None, method,
                      include_linear=include_linear, fold_batchnorm=fold_batchnorm)
    config = dataclasses.replace(config, calibration=_calibration_config(calibration_samples, fit, False, 0, calibration_memory, provider))
    images = image_spec(image_size, resize, scale, mean, std, channel_order, layout)
    result = run_analyze(input_model, config=config, input_shapes=_shapes(input_shape), calibration=calibration, images=images)
    if report is not None:
        result.write_json(report)
    Renderer().analyze_report(result)


def image_spec(image_size=None, resize="stretch", scale=1 / 255, mean=None, std=None, channel_order="rgb", layout=None):
    """The :class:`onnxfactor.data.ImageSpec` of the image options (``--image-size HxW``, ``--mean a,b,c``, ...).

    Raises :class:`onnxfactor.errors.UsageError` naming the flag of a bad value.
    """
    from onnxfactor.data import image_spec as parse

    return parse(image_size, resize, scale, mean, std, channel_order, layout)


def validate(
    original_model: opt.InputModel,
    compressed_model: Path = typer.Argument(..., help="The model to compare against ORIGINAL_MODEL.", show_default=False),
    input_shape: opt.InputShapes = None,
    data: opt.Data = None,
    metric: opt.Metric = None,
    image_size: opt.ImageSize = None,
    resize: opt.Resize = opt.ResizeMode.stretch,
    scale: opt.Scale = 1 / 255,
    mean: opt.Mean = None,
    std: opt.Std = None,
    channel_order: opt.ChannelOrder = opt.ChannelOrderName.rgb,
    layout: opt.Layout = None,
    seed: opt.Seed = 0,
    max_samples: opt.MaxSamples = None,
    provider: opt.Provider = None,
    threads: opt.Threads = None,
    latency_runs: opt.LatencyRuns = 50,
    max_rel_error: opt.MaxRelError = None,
    report: opt.ReportPath = None,
) -> None:
    """Compare two models' outputs (errors, top-1 agreement, accuracy) and latency in ONNX Runtime."""
    from onnxfactor.validation.run import ValidationOptions, validate_files

    options = ValidationOptions(
        data=data, images=image_spec(image_size, resize, scale, mean, std, channel_order, layout), seed=seed,
        max_samples=max_samples, provider=provider, threads=threads, latency_runs=latency_runs, max_rel_error=max_rel_error,
        metric=_metric(metric),
    )
    result = validate_files(original_model, compressed_model, options=options, input_shapes=_shapes(input_shape), report_path=report)
    Renderer().validation(result.to_dict())
    result_ok = result.passed(max_rel_error)
    if not result_ok:
        from onnxfactor.errors import ValidationFailed

        raise ValidationFailed(f"worst output relative L2 error {result.worst_rel_l2:.3g} exceeds --max-rel-error {max_rel_error:g}")


def plot(
    report: Path = typer.Argument(..., help="A compress report (--report r.json) written with --measure.", show_default=False),
    output: Path = typer.Argument(..., help="The PNG to write.", show_default=False),
) -> None:
    """Plot each layer's MAC cut against its measured speedup (needs the [plot] extra)."""
    from onnxfactor.pipeline import check_output_path
    from onnxfactor.plot import plot_layer_speed

    check_output_path(output, "plot", protected={"report": report})
    count = plot_layer_speed(report, output)
    typer.echo(f"plotted {count} timed layers to {output}")
