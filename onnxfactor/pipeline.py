"""The only place that wires the stages:
load -> analyse -> ranks -> decompose -> rewrite -> export -> (check, validate, save).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx
import onnx_graphsurgeon as gs

from onnxfactor import io as model_io
from onnxfactor.analysis import count_params, find_conv_sites, name_unnamed_nodes
from onnxfactor.checks import check_written_model
from onnxfactor.config import FIT_CHOICES, CompressConfig
from onnxfactor.data.shapes import shape_sources
from onnxfactor.decompose import LayerDecomposer
from onnxfactor.errors import UsageError, ValidationFailed
from onnxfactor.io import check_output_path
from onnxfactor.linear import LinearSite, decompose_linear, find_linear_sites
from onnxfactor.linear import share_key as linear_share_key
from onnxfactor.prepare import Prepared, copy_model, load_explicit, model_opset, prepare, runnable
from onnxfactor.report import CompressReport, Totals
from onnxfactor.rewrite import Rewriter, export_model
from onnxfactor.speed import Candidate, measured_selection, time_options
from onnxfactor.validation.run import ValidationOptions, check_disjoint, validate
from onnxfactor.validation.warning import accuracy_warning

#: progress(done, total, layer_name) is called after each layer.
Progress = Callable[[int, int, str], None]


@dataclass
class CompressResult:
    """The compressed model and the report of what was done."""

    model: onnx.ModelProto
    report: CompressReport
    external_data: bool = False  # the source stored its weights as external data
    run_error: Exception | None = None  # the model does not run at the report's input shapes

    def __iter__(self):  # allows ``model, report = compress(...)``
        return iter((self.model, self.report))


def compress(
    model: str | os.PathLike | onnx.ModelProto,
    *,
    config: CompressConfig | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    progress: Progress | None = None,
    timer=None,
    calibration=None,
    images=None,
    finetune=None,
    finetune_data=None,
    held_out=None,
) -> CompressResult:
    """Decompose the Conv layers of ``model`` and return the rewritten model and a report.

    ``model`` is a path or a ``ModelProto`` (never modified). ``input_shapes`` fixes dynamic input
    dimensions for shape inference (MAC counts); see :func:`onnxfactor.validation.resolve_input_shapes`
    for the defaults. With ``config.latency`` set, layers are kept only where ONNX Runtime measures
    them faster and the model is guarded end to end (see :mod:`onnxfactor.speed`); ``timer``
    replaces the ONNX Runtime timer (:class:`onnxfactor.latency.Timer`, e.g. a fake one in tests).
    ``calibration`` (an ``.npz``, an image folder read with ``images``, a ``script.py[:function]``,
    any iterable of feed dicts or an ONNX Runtime ``CalibrationDataReader``; see
    :func:`onnxfactor.data.open_source`) fits the factors to the layers' outputs on those inputs
    and corrects them sequentially, as ``config.calibration`` says (:mod:`onnxfactor.calibration`).
    ``finetune`` (a :class:`~onnxfactor.config.FinetuneConfig`) then distils the original into the
    compressed model on the same data, or on ``finetune_data`` (:mod:`onnxfactor.finetune`); a model
    the converter cannot run falls back to the layer-wise reconstruction, with the reason in the report.
    ``finetune.stage_size`` makes it iterative (:mod:`onnxfactor.finetune.iterative`), each stage
    measured on ``held_out`` (:class:`ValidationOptions` with data) when given.
    With ``config.include_linear`` the fully connected layers (Gemm / MatMul) are decomposed too,
    by :mod:`onnxfactor.linear`. Nothing is written to disk; see :func:`compress_file`.
    """
    config = config or CompressConfig()
    timings = {}
    t0 = time.perf_counter()
    prep = prepare(model, input_shapes, include_linear=config.include_linear, data=shape_sources(calibration, images, held_out),
                    fold_batchnorm=config.fold_batchnorm)
    explicit = load_explicit(config, prep.sites, prep.linear_sites)
    timings["load_and_analyse"] = time.perf_counter() - t0
    fallback = teacher = None
    if finetune is not None:
        from onnxfactor.finetune import stage as finetune_stage

        finetune_data = calibration if finetune_data is None else finetune_data
        config, fallback = finetune_stage.preflight(runnable(prep.loaded), config, finetune_data)
        if fallback is None and finetune.stage_size:
            from onnxfactor.finetune.iterative import compress_iterative

            return compress_iterative(model, config=config, finetune=finetune, stage_size=finetune.stage_size, calibration=calibration,
                                      finetune_data=finetune_data, images=images, input_shapes=prep.input_shapes, held_out=held_out,
                                      progress=progress, timer=timer)
        teacher = copy_model(runnable(prep.loaded))  # the final build rewrites prep's model in place
    reconstruct = _reconstructor(config) if calibration is not None else None  # a missing torch fails fast
    calib = _calibrate(prep, config, explicit, calibration, images, progress)
    if calib is not None:
        timings["calibration_statistics"] = calib.seconds

    t1 = time.perf_counter()
    decomposer = LayerDecomposer(config, explicit, prep.sites, calib)
    measuring = config.latency is not None
    layers, candidates = [], []
    for index, site in enumerate(prep.sites):
        layer, options = decomposer.run(site, variants=measuring and config.latency.rank_search)
        layers.append(layer)
        if options:
            candidates.append(Candidate(site, layer, options))
        if progress is not None:
            progress(index + 1, len(prep.sites), site.name)
    if prep.linear_sites:  # include_linear: Gemm / MatMul layers, by onnxfactor.linear
        linear_layers, prep.linear = decompose_linear(prep.linear_sites, config, explicit, calibration=calibration, images=images,
                                                      model=runnable(prep.loaded) if calibration is not None else None,
                                                      progress=progress)
        layers += linear_layers
    timings["decompose"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    params_before = count_params(prep.loaded.model)
    speed = out = None
    if measuring and (candidates or prep.linear):
        t = time.perf_counter()
        if prep.run_error is not None:
            raise prep.run_error
        out, speed = measured_selection(
            runnable(prep.loaded), prep.input_shapes, decomposer, candidates, prep.linear, config.latency, timer, opset=model_opset(prep),
            build=lambda: _build(prep, candidates, in_place=False, hooi_iters=config.hooi_iters), progress=progress)
        timings["latency"] = time.perf_counter() - t
    correction = None
    if calib is not None and (config.calibration.correct or reconstruct is not None):
        t = time.perf_counter()
        correction = _correct(prep, candidates, calib, config, reconstruct, progress)
        timings["correction"] = time.perf_counter() - t
        out = None  # the corrected weights go into the final build
    if out is None:
        out = _build(prep, candidates, in_place=True, hooi_iters=config.hooi_iters)
    timings["export"] = time.perf_counter() - t2 - timings.get("latency", 0.0) - timings.get("correction", 0.0)
    tuned = None
    if finetune is not None:
        t = time.perf_counter()
        tuned = fallback or finetune_stage.finetune_or_skip(teacher, out, finetune_data, finetune, images=images,
                                                            samples=config.calibration.samples, progress=progress)
        timings["finetune"] = time.perf_counter() - t

    report = CompressReport(
        config=dataclasses.asdict(config),
        input_shapes={k: list(v) for k, v in prep.input_shapes.items()},
        layers=layers,
        skipped=[dataclasses.asdict(s) for s in prep.skipped],
        folded=list(prep.loaded.folded),
        totals=Totals.of(layers, params_before, count_params(out)),
        timings=timings,
        input_path=str(prep.loaded.path) if prep.loaded.path else None,
        speed=speed,
        calibration=None if calib is None else {**calib.to_dict(), "fit": config.calibration.fit, "correction": correction},
        finetune=tuned,
    )
    report.warnings.extend(prep.loaded.normalised)
    if speed is not None and speed.get("warning"):
        report.warnings.append(speed["warning"])
    if not report.totals.macs_known:
        report.warnings.append("some Conv output shapes are unknown: MAC totals cover only the known layers (set --input-shape)")
    timings["total"] = time.perf_counter() - t0
    return CompressResult(out, report, external_data=prep.loaded.external_data, run_error=prep.run_error)


def calibrate(
    model: str | os.PathLike | onnx.ModelProto,
    calibration,
    *,
    config: CompressConfig | None = None,
    images=None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    progress: Progress | None = None,
):
    """The calibration statistics of ``model`` on ``calibration`` (see :func:`compress`), computed once.

    The result (:class:`onnxfactor.calibration.CalibrationData`) can be passed as ``calibration=``
    to :func:`compress` and :func:`analyze` of the same model any number of times, e.g. to try
    several rank settings without another pass over the data. ``config`` selects the Convs
    (``nodes`` / ``exclude``) and the calibration options.
    """
    config = config or CompressConfig()
    prep = prepare(model, input_shapes, data=shape_sources(calibration, images), fold_batchnorm=config.fold_batchnorm)
    return _calibrate(prep, config, load_explicit(config, prep.sites), calibration, images, progress)


def _calibrate(prep: Prepared, config: CompressConfig, explicit, calibration, images, progress):
    """Statistics of the selected main-graph Convs on the calibration data (None without data)."""
    from onnxfactor.calibration import CalibrationData

    if calibration is None or isinstance(calibration, CalibrationData):
        return calibration and calibration.reusable(config.fold_batchnorm)
    from onnxfactor.calibration import collect_statistics
    from onnxfactor.data import open_source
    from onnxfactor.decompose import selection_reason
    from onnxfactor.validation import resolve_providers

    cal = config.calibration
    if cal.fit not in FIT_CHOICES:
        raise UsageError(f"unknown fit {cal.fit!r}; choose one of {', '.join(FIT_CHOICES)} (--fit)")
    source = open_source(calibration, prep.loaded.model, images=images, max_samples=cal.samples,
                         batch_size=cal.batch_size, role="calibration")
    model = runnable(prep.loaded)
    sites = [s for s in prep.sites if selection_reason(s, config, explicit) is None]
    report = (lambda done, total, label: progress(done, total or 0, label)) if progress is not None else None
    stats = collect_statistics(model, sites, source, cal, providers=resolve_providers(cal.provider), progress=report)
    stats.fold_batchnorm = config.fold_batchnorm
    return stats


def _reconstructor(config: CompressConfig):
    """The layer-wise reconstruction step (``reconstruct_steps > 0``; needs torch), or None."""
    if config.calibration.reconstruct_steps <= 0:
        return None
    from onnxfactor.calibration.reconstruct import Reconstructor

    return Reconstructor(config.calibration)


def _correct(prep: Prepared, candidates: list[Candidate], calib, config: CompressConfig, reconstruct, progress):
    from onnxfactor.calibration.correct import correct_chains
    from onnxfactor.validation import resolve_providers

    def build():
        return _build(prep, candidates, in_place=False, hooi_iters=config.hooi_iters)

    original = runnable(prep.loaded)
    return correct_chains(candidates, build, original, calib, config.calibration,
                          providers=resolve_providers(config.calibration.provider), reconstruct=reconstruct, progress=progress)


def _apply(rewriter: Rewriter, candidate: Candidate, hooi_iters: int) -> list[str]:
    site, chain = candidate.site, candidate.chain
    if isinstance(site, LinearSite):
        return rewriter.replace_linear(site, chain, linear_share_key(site, chain))
    share_key = (site.graph_path, site.weight.name, chain.method, tuple(sorted(chain.ranks.items())), hooi_iters)
    if chain.fit == "data" or chain.bias is not None:  # fitted to this Conv's own inputs: not shared
        share_key += (id(chain),)
    return rewriter.replace(site, chain, share_key)


def _build(prep: Prepared, candidates: list[Candidate], *, in_place: bool, hooi_iters: int) -> onnx.ModelProto:
    """The model with every candidate's ``chain`` (and every linear one's, ``prep.linear``) applied
    (``None``: kept); marks the report rows.

    ``in_place`` rewrites ``prep``'s graph and model (the final output: its unchanged weights are
    not copied again); otherwise a copy of the normalised model is rewritten, for timing a trial.
    """
    if in_place:
        graph, base, sites = prep.graph, prep.loaded.model, None
    else:  # the same sites, found again in the copy
        base = copy_model(prep.loaded.model)
        graph = gs.import_onnx(base)
        name_unnamed_nodes(graph)
        sites = {(s.graph_path, s.name): s for s in find_conv_sites(graph, prep.shapes)[0]}
        if prep.linear:
            sites.update({(s.graph_path, s.name): s for s in find_linear_sites(graph, prep.shapes)[0]})
    rewriter = Rewriter(graph)
    for c in [*candidates, *prep.linear]:
        c.layer.new_nodes, c.layer.status = [], "kept"
        if c.chain is None:
            continue
        c.layer.reason = None
        site = c.site if sites is None else sites[(c.site.graph_path, c.site.name)]
        c.layer.new_nodes = _apply(rewriter, Candidate(site, c.layer, [c.chain]), hooi_iters)
        c.layer.status = "decomposed"
    out = export_model(graph, base)
    return model_io.restore_conventions(out, prep.loaded.ir_version)


def analyze(
    model: str | os.PathLike | onnx.ModelProto,
    *,
    config: CompressConfig | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    calibration=None,
    images=None,
    timer=None,
) -> CompressReport:
    """Per layer: shapes, VBMF ranks and sigma^2, the chosen ranks and the predicted compression.

    Runs the same rank choice and decomposition as :func:`compress` (with ``calibration``: the
    data-aware fit, and each layer's output error on the calibration data) but rewrites nothing.
    With a ``timer`` (:class:`onnxfactor.latency.Timer`) each Conv that would be decomposed is also
    timed against its chain (``LayerReport.latency``), as the measured selection of ``compress``.
    """
    config = config or CompressConfig()
    prep = prepare(model, input_shapes, include_linear=config.include_linear, data=shape_sources(calibration, images),
                    fold_batchnorm=config.fold_batchnorm)
    explicit = load_explicit(config, prep.sites, prep.linear_sites)
    calib = _calibrate(prep, config, explicit, calibration, images, None)
    decomposer = LayerDecomposer(config, explicit, prep.sites, calib)
    layers = []
    for site in prep.sites:
        layer, options = decomposer.run(site)
        if timer is not None and options and layer.reason is None:
            timings = time_options(timer, site, options[:1], opset=model_opset(prep))
            layer.latency = {"note": timings} if isinstance(timings, str) else timings[0].to_dict()
        layers.append(layer)
    if prep.linear_sites:
        layers += decompose_linear(prep.linear_sites, config, explicit, calibration=calibration, images=images,
                                   model=runnable(prep.loaded) if calibration is not None else None)[0]
    for layer in layers:
        if layer.reason is None and layer.params_after is not None:
            layer.status = "would decompose"
    report = CompressReport(
        config=dataclasses.asdict(config),
        input_shapes={k: list(v) for k, v in prep.input_shapes.items()},
        layers=layers,
        skipped=[dataclasses.asdict(s) for s in prep.skipped],
        folded=list(prep.loaded.folded),
        input_path=str(prep.loaded.path) if prep.loaded.path else None,
        calibration=None if calib is None else {**calib.to_dict(), "fit": config.calibration.fit},
        warnings=list(prep.loaded.normalised),
    )
    predicted = [dataclasses.replace(l, status="decomposed" if l.status == "would decompose" else l.status) for l in layers]
    params = count_params(prep.loaded.model)
    totals = Totals.of(predicted, params, params)
    totals.model_params_after = (totals.model_params_before - totals.conv_params_before + totals.conv_params_after
                                 - totals.linear_params_before + totals.linear_params_after)
    report.totals = totals
    return report


def _preflight_output(input_path: Path, output_path: Path, report_path: Path | None) -> None:
    """Fail fast, before any heavy work, on an output or report that cannot or must not be written.

    Neither may be the input model, and the report may not be the output model.
    """
    if not input_path.exists():
        return  # load_model reports it
    check_output_path(output_path, "output", protected={"input model": input_path})
    if report_path is not None:
        check_output_path(report_path, "report", protected={"input model": input_path, "output model": output_path})


def compress_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    config: CompressConfig | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    validation: ValidationOptions | None = ValidationOptions(),
    report_path: str | os.PathLike | None = None,
    progress: Progress | None = None,
    calibration=None,
    images=None,
    allow_overlap: bool = False,
    external_data: bool = False,
    finetune=None,
) -> CompressReport:
    """Compress a model file and write the result atomically, only after it passes every check.

    ``calibration`` and ``images`` are :func:`compress`'s. Calibration and validation data that
    share a file or a sample are refused (:class:`UsageError`, exit 2) unless ``allow_overlap``:
    accuracy measured on the samples the factors were fitted to is not what users will see.

    Checks, on a temporary file next to the output: ``onnx.checker`` (full), an ONNX Runtime
    load, and (unless ``validation`` is None) the comparison against the original, which fails
    with :class:`ValidationFailed` (exit code 3) when ``validation.max_rel_error`` is exceeded; no
    model is written then. The report (if asked for) is written in every case that got that far.
    The compressed model is dropped from memory once written, before the checks load the file.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    report_path = Path(report_path) if report_path is not None else None
    _preflight_output(input_path, output_path, report_path)
    from onnxfactor.data import check_data_exists

    check_data_exists(calibration, role="calibration")
    if validation is not None:  # fail on a bad provider or data before the long part
        from onnxfactor.validation import resolve_providers

        resolve_providers(validation.provider)
        check_data_exists(validation.data, role="validation")
        if calibration is not None and validation.data is not None and not allow_overlap:
            check_disjoint(input_path, calibration, images, config, validation)
    held_out = validation if validation is not None and validation.data is not None else None
    result = compress(input_path, config=config, input_shapes=input_shapes, progress=progress, calibration=calibration, images=images,
                      finetune=finetune, held_out=held_out)
    report, external_data = result.report, result.external_data or external_data
    run_error = result.run_error
    if not report.decomposed:  # the input itself, not a re-export of its normalised copy
        report.warnings.append("no layer was decomposed: the output is the input model unchanged")
        result.model = onnx.load(str(input_path))

    def check(tmp_path: Path) -> None:
        t = time.perf_counter()
        report.warnings.extend(check_written_model(tmp_path, original=input_path))
        report.timings["check"] = time.perf_counter() - t
        if validation is None:
            return
        if run_error is not None and validation.data is None:  # random inputs at shapes the model cannot run
            raise run_error
        t = time.perf_counter()
        shapes = input_shapes if validation.data is not None else {k: tuple(v) for k, v in report.input_shapes.items()}
        vr = validate(input_path, tmp_path, options=validation, input_shapes=shapes)
        report.validation = vr.to_dict()
        report.timings["validate"] = time.perf_counter() - t
        report.accuracy_warning = accuracy_warning(vr, random_inputs=validation.data is None, calibrated=calibration is not None,
                                                   reconstructing=(config or CompressConfig()).calibration.reconstruct_steps > 0)
        if not vr.passed(validation.max_rel_error):
            raise ValidationFailed(
                f"worst output relative L2 error {vr.worst_rel_l2:.3g} exceeds --max-rel-error "
                f"{validation.max_rel_error:g}; no model written"
            )

    try:
        t = time.perf_counter()
        with model_io.write_temporary(result.model, output_path, external_data=external_data) as written:
            report.timings["write"] = time.perf_counter() - t
            # The checks and validation read the file: the model (the largest object of the run)
            # must be gone before they load their own copies, or its memory adds to theirs.
            del result
            model_io.release_freed_memory()
            check(written.path)
            written.commit()
        report.output_path = str(output_path)
        report.totals.model_bytes_before = model_io.model_file_bytes(input_path, external_data)
        report.totals.model_bytes_after = model_io.model_file_bytes(output_path, external_data)
    finally:
        if report_path is not None:
            report.write_json(report_path)
    return report
