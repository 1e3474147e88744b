"""The only place that wires the stages:
load -> analyse -> ranks -> decompose -> rewrite -> export -> (check, validate, save).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxfactor import io as model_io
from onnxfactor.analysis import ConvSite, SkippedNode, find_conv_sites, infer_shapes, name_unnamed_nodes, record_shapes
from onnxfactor.config import CompressConfig
from onnxfactor.errors import InputModelError, NothingToCompress, OutputError, ValidationFailed
from onnxfactor.methods import METHODS, tucker2
from onnxfactor.methods.cp import DegenerateFit
from onnxfactor.ranks.policies import RankChoice, load_rank_file
from onnxfactor.report import CompressReport, LayerReport, Totals
from onnxfactor.rewrite import Rewriter, export_model

#: progress(done, total, layer_name) is called after each layer.
Progress = Callable[[int, int, str], None]


@dataclass
class CompressResult:
    """The compressed model and the report of what was done."""

    model: onnx.ModelProto
    report: CompressReport
    external_data: bool = False  # the source stored its weights as external data

    def __iter__(self):  # allows ``model, report = compress(...)``
        return iter((self.model, self.report))


@dataclass
class _Prepared:
    loaded: model_io.LoadedModel
    graph: gs.Graph
    sites: list[ConvSite]
    skipped: list[SkippedNode]
    input_shapes: dict


def _prepare(source, input_shapes: dict | None) -> _Prepared:
    from onnxfactor.validation.inputs import resolve_input_shapes

    loaded = model_io.load_model(source)
    resolved = resolve_input_shapes(loaded.model, input_shapes or {})
    shapes = infer_shapes(loaded.model, resolved)
    graph = gs.import_onnx(loaded.model)
    name_unnamed_nodes(graph)
    sites, skipped = find_conv_sites(graph, shapes)
    unknown = [s for s in sites if s.graph_path == "" and (s.in_spatial is None or s.out_spatial is None)]
    if unknown:
        names = [t for s in unknown for t in (s.node.inputs[0].name, s.node.outputs[0].name)]
        recorded = record_shapes(loaded.model, loaded.ir_version, resolved, names)
        for site in unknown:
            site.input_shape = recorded.get(site.node.inputs[0].name, site.input_shape)
            site.output_shape = recorded.get(site.node.outputs[0].name, site.output_shape)
    if not sites and not skipped:
        raise NothingToCompress("the model has no Conv node: nothing to compress")
    return _Prepared(loaded, graph, sites, skipped, resolved)


def _selection_reason(site: ConvSite, config: CompressConfig, explicit: dict | None) -> str | None:
    if config.nodes and site.name not in config.nodes:
        return "not selected (--nodes)"
    if site.name in config.exclude:
        return "excluded (--exclude)"
    if explicit is not None and site.name not in explicit:
        return "not listed in the rank file"
    return None


def _layer_base(site: ConvSite) -> LayerReport:
    g = site.geometry
    return LayerReport(
        name=site.name,
        graph_path=site.graph_path,
        status="kept",
        reason=None,
        weight_shape=list(site.weight_shape),
        group=g.group,
        kernel_shape=list(g.kernel_shape),
        strides=list(g.strides),
        input_shape=list(site.input_shape) if site.input_shape else None,
        output_shape=list(site.output_shape) if site.output_shape else None,
        params_before=site.params,
        macs_before=site.macs,
    )


def _kept_reason(choice: RankChoice) -> str:
    notes = "; ".join(f"{m.mode}: {m.note}" for m in choice.modes)
    return f"no mode worth decomposing ({notes})"


class _LayerDecomposer:
    """Ranks and decomposes sites, caching spectra per weight (a shared weight is analysed once)."""

    def __init__(self, config: CompressConfig, explicit: dict | None, sites: list[ConvSite]):
        if config.method not in METHODS:
            from onnxfactor.errors import UsageError

            raise UsageError(f"unknown method {config.method!r}; choose one of {', '.join(METHODS)} (--method)")
        self.config = config
        self.explicit = explicit
        self.method = METHODS[config.method]
        self._spectra: dict[tuple, object] = {}
        # Spectra hold C x C eigenvector matrices (about the model's size in total): keep one only
        # until the last Conv sharing its weight has been processed.
        self._users = Counter(self._key(site) for site in sites)

    def in_mode(self, site: ConvSite) -> bool:
        return site.in_per_group > self.config.in_mode_min_channels

    def _key(self, site: ConvSite) -> tuple:
        return (site.graph_path, site.weight.name, site.geometry.group, self.in_mode(site))

    def spectra(self, site: ConvSite, weight: np.ndarray):
        key = self._key(site)
        spectra = self._spectra.get(key)
        if spectra is None:
            spectra = self.method.weight_spectra(weight, site.geometry, in_mode=self.in_mode(site))
        self._users[key] -= 1
        if self._users[key] > 0:
            self._spectra[key] = spectra
        else:
            self._spectra.pop(key, None)
        return spectra

    def choose(self, site: ConvSite) -> tuple[RankChoice, np.ndarray, object]:
        weight = np.asarray(site.weight_array(), dtype=np.float32)
        spectra = self.spectra(site, weight)
        entry = self.explicit.get(site.name) if self.explicit is not None else None
        if entry is not None and "in" in entry and not site.geometry.is_pointwise and not self.in_mode(site):
            entry = {**entry, "in": None}
        return self.method.choose_ranks(spectra, self.config.ranks, entry), weight, spectra

    def run(self, site: ConvSite, rewriter: Rewriter | None) -> LayerReport:
        start = time.perf_counter()
        layer = _layer_base(site)
        reason = _selection_reason(site, self.config, self.explicit)
        if reason is not None:
            layer.reason = reason
            return layer
        choice, weight, spectra = self.choose(site)
        layer.modes = [m.to_dict() for m in choice.modes]
        if not choice.decomposes:
            layer.reason = _kept_reason(choice)
            layer.seconds = time.perf_counter() - start
            return layer
        try:
            chain = self.method.decompose(weight, site.geometry, choice.ranks, spectra=spectra, hooi_iters=self.config.hooi_iters)
        except DegenerateFit as e:
            chain, choice = self._fallback(weight, site, spectra)
            layer.modes = [m.to_dict() for m in choice.modes]
            layer.fallback = f"CP fit degenerate ({e.reason}); fell back to Tucker-2"
            if chain is None:
                layer.reason = layer.fallback + ": " + _kept_reason(choice)
                layer.seconds = time.perf_counter() - start
                return layer
        layer.method, layer.ranks = chain.method, dict(chain.ranks)
        layer.params_after = chain.params
        if site.in_spatial is not None and site.out_spatial is not None:
            layer.macs_after = chain.macs(site.in_spatial, site.out_spatial)
        layer.rel_reconstruction_error = chain.rel_error
        layer.reason = self._margin_reason(layer)
        if layer.reason is None and rewriter is not None:
            share_key = (site.graph_path, site.weight.name, tuple(sorted(chain.ranks.items())), self.config.hooi_iters)
            layer.new_nodes = rewriter.replace(site, chain, share_key)
            layer.status = "decomposed"
        layer.seconds = time.perf_counter() - start
        return layer

    def _fallback(self, weight: np.ndarray, site: ConvSite, spectra):
        """Tucker-2 in place of a degenerate CP fit (the CP spectra include Tucker-2's two modes)."""
        ranks = self.config.ranks
        if ranks.policy == "file":  # a CP rank-file entry is not a Tucker-2 entry: use VBMF
            ranks = dataclasses.replace(ranks, policy="vbmf")
        choice = tucker2.choose_ranks(spectra, ranks, None)
        if not choice.decomposes:
            return None, choice
        chain = tucker2.decompose(weight, site.geometry, choice.ranks, spectra=spectra, hooi_iters=self.config.hooi_iters)
        return chain, choice

    def _margin_reason(self, layer: LayerReport) -> str | None:
        m = self.config.min_reduction
        if m is None:
            return None
        cuts = {"params": 1 - layer.params_after / layer.params_before}
        if layer.macs_before and layer.macs_after is not None:
            cuts["MACs"] = 1 - layer.macs_after / layer.macs_before
        short = [f"{k} {v:+.0%}" for k, v in cuts.items() if v < m]
        if short:
            return f"chain would change {', '.join(short)}; needs a cut of at least {m:.0%} (--min-reduction)"
        return None


def _model_params(model: onnx.ModelProto) -> int:
    total = 0

    def visit(graph: onnx.GraphProto):
        nonlocal total
        total += sum(math.prod(t.dims) for t in graph.initializer)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        visit(sub)

    visit(model.graph)
    return total


def _totals(layers: list[LayerReport], params_before: int, params_after: int) -> Totals:
    t = Totals(model_params_before=params_before, model_params_after=params_after)
    for layer in layers:
        decomposed = layer.status == "decomposed"
        t.conv_params_before += layer.params_before
        t.conv_params_after += layer.params_after if decomposed else layer.params_before
        if layer.macs_before is None or (decomposed and layer.macs_after is None):
            t.macs_known = False
            continue
        t.conv_macs_before += layer.macs_before
        t.conv_macs_after += layer.macs_after if decomposed else layer.macs_before
    return t


def _load_explicit(config: CompressConfig, sites: list[ConvSite]) -> dict | None:
    if config.ranks.policy != "file":
        return None
    if config.ranks.rank_file is None:
        from onnxfactor.errors import UsageError

        raise UsageError("rank policy 'file' needs a rank file (--rank-file ranks.json)")
    known = {s.name: (s.geometry.is_pointwise, s.out_per_group, s.in_per_group) for s in sites}
    return load_rank_file(config.ranks.rank_file, known, method=config.method)


def compress(
    model: str | os.PathLike | onnx.ModelProto,
    *,
    config: CompressConfig | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    progress: Progress | None = None,
) -> CompressResult:
    """Decompose the Conv layers of ``model`` and return the rewritten model and a report.

    ``model`` is a path or a ``ModelProto`` (never modified). ``input_shapes`` fixes dynamic input
    dimensions for shape inference (MAC counts); see :func:`onnxfactor.validation.resolve_input_shapes`
    for the defaults. Nothing is written to disk; see :func:`compress_file`.
    """
    config = config or CompressConfig()
    timings = {}
    t0 = time.perf_counter()
    prep = _prepare(model, input_shapes)
    explicit = _load_explicit(config, prep.sites)
    timings["load_and_analyse"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    decomposer = _LayerDecomposer(config, explicit, prep.sites)
    rewriter = Rewriter(prep.graph)
    layers = []
    for index, site in enumerate(prep.sites):
        layers.append(decomposer.run(site, rewriter))
        if progress is not None:
            progress(index + 1, len(prep.sites), site.name)
    timings["decompose"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    params_before = _model_params(prep.loaded.model)
    # The normalised copy becomes the output: its unchanged weights are not copied again.
    out = export_model(prep.graph, prep.loaded.model)
    out = model_io.restore_conventions(out, prep.loaded.ir_version)
    timings["export"] = time.perf_counter() - t2

    report = CompressReport(
        config=dataclasses.asdict(config),
        input_shapes={k: list(v) for k, v in prep.input_shapes.items()},
        layers=layers,
        skipped=[dataclasses.asdict(s) for s in prep.skipped],
        folded=list(prep.loaded.folded),
        totals=_totals(layers, params_before, _model_params(out)),
        timings=timings,
        input_path=str(prep.loaded.path) if prep.loaded.path else None,
    )
    if not report.totals.macs_known:
        report.warnings.append("some Conv output shapes are unknown: MAC totals cover only the known layers (set --input-shape)")
    timings["total"] = time.perf_counter() - t0
    return CompressResult(out, report, external_data=prep.loaded.external_data)


def analyze(
    model: str | os.PathLike | onnx.ModelProto,
    *,
    config: CompressConfig | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> CompressReport:
    """Per layer: shapes, VBMF ranks and sigma^2, the chosen ranks and the predicted compression.

    Runs the same rank choice and decomposition as :func:`compress` but rewrites nothing.
    """
    config = config or CompressConfig()
    prep = _prepare(model, input_shapes)
    explicit = _load_explicit(config, prep.sites)
    decomposer = _LayerDecomposer(config, explicit, prep.sites)
    layers = [decomposer.run(site, None) for site in prep.sites]
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
    )
    predicted = [dataclasses.replace(l, status="decomposed" if l.status == "would decompose" else l.status) for l in layers]
    params = _model_params(prep.loaded.model)
    totals = _totals(predicted, params, params)
    totals.model_params_after = totals.model_params_before - totals.conv_params_before + totals.conv_params_after
    report.totals = totals
    return report


def check_written_model(path: Path, original: Path | onnx.ModelProto | None = None) -> list[str]:
    """``onnx.checker`` (full check) and an ONNX Runtime load of the model file at ``path``.

    If the full check fails on a model whose original already fails it (some exporters write
    models that strict shape inference rejects), the basic check is required instead and a
    warning is returned. Raises :class:`OutputError` when a check fails, except when ONNX Runtime
    cannot load the original either: then the input is at fault and :class:`InputModelError` is raised.
    """
    warnings = []
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # noqa: BLE001 - checker raises several types
        original_fails = False
        if original is not None:
            try:
                onnx.checker.check_model(str(original) if isinstance(original, Path) else original, full_check=True)
            except Exception:  # noqa: BLE001
                original_fails = True
        if not original_fails:
            raise OutputError(f"the rewritten model fails onnx.checker: {str(e).splitlines()[0]}") from None
        try:
            onnx.checker.check_model(str(path))
        except Exception as e2:  # noqa: BLE001
            raise OutputError(f"the rewritten model fails onnx.checker: {str(e2).splitlines()[0]}") from None
        warnings.append(f"full onnx.checker fails on the original model too ({str(e).splitlines()[0]}); basic check passed")
    from onnxfactor.validation.providers import make_session

    try:
        make_session(path, ["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own types
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if original is not None:
            try:
                make_session(original, ["CPUExecutionProvider"])
            except Exception as e0:  # noqa: BLE001 - e.g. a weight whose type does not match its Conv input
                reason0 = (str(e0).strip().splitlines() or [type(e0).__name__])[0]
                raise InputModelError(f"ONNX Runtime cannot load the input model: {reason0}; fix the input model first") from None
        raise OutputError(f"ONNX Runtime cannot load the rewritten model: {reason}") from None
    return warnings


@dataclass(frozen=True)
class ValidationOptions:
    """How to compare the compressed model against the original in ONNX Runtime."""

    data: Path | None = None
    seed: int = 0
    max_samples: int | None = None
    provider: str | None = None
    threads: int | None = None
    latency_runs: int = 50
    max_rel_error: float | None = None


def validate(
    original: str | os.PathLike | onnx.ModelProto,
    compressed: str | os.PathLike | onnx.ModelProto,
    *,
    options: ValidationOptions | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
):
    """Run both models in ONNX Runtime on the same inputs; errors, agreement, accuracy, latency.

    Returns a :class:`onnxfactor.validation.ValidationResult`.
    """
    from onnxfactor.validation import make_inputs, resolve_providers
    from onnxfactor.validation import validate as run_validation

    options = options or ValidationOptions()
    reference = original if isinstance(original, onnx.ModelProto) else model_io.load_model(original).model
    inputs = make_inputs(reference, data=options.data, shapes=input_shapes or {}, seed=options.seed, max_samples=options.max_samples)
    providers = resolve_providers(options.provider)
    return run_validation(
        original, compressed, inputs=inputs, providers=providers, threads=options.threads, latency_runs=options.latency_runs
    )


def validate_files(original, compressed, *, options: ValidationOptions, input_shapes=None, report_path=None):
    """:func:`validate` for two files, optionally writing the result as JSON (never over either model)."""
    if report_path is not None:
        check_output_path(report_path, "report", protected={"original model": original, "compressed model": compressed})
    for p in (original, compressed):
        model_io.load_model(p)  # clear errors for missing / non-ONNX files
    result = validate(Path(original), Path(compressed), options=options, input_shapes=input_shapes)
    if report_path is not None:
        import json

        from onnxfactor.report import to_jsonable

        Path(report_path).write_text(json.dumps(to_jsonable(result.to_dict()), indent=2) + "\n")
    return result


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file: same resolved path, or hard links / other spellings of one file."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(target: str | os.PathLike, what: str, *, protected: dict[str, str | os.PathLike] | None = None) -> None:
    """Raise :class:`OutputError` when ``target`` cannot or must not be written; cheap, so run it first.

    ``what`` names the file in the message ("output", "report"). ``protected`` maps a label to a path
    that ``target`` must not be (in any spelling, or as a hard link), e.g. ``{"input model": path}``.
    Checks that ``target`` is not a directory and that its directory exists, is a directory and is
    writable (``os.access``; root passes it whatever the permissions).
    """
    target = Path(target)
    for label, path in (protected or {}).items():
        if path is not None and _same_file(target, Path(path)):
            raise OutputError(f"{what} path {target} is the {label}; choose another {what} file")
    if target.is_dir():
        raise OutputError(f"{what} path {target} is a directory; give a file name")
    parent = target.absolute().parent
    if not parent.is_dir():
        if parent.exists():
            raise OutputError(f"{what} directory {parent} is not a directory (it is a file); choose another {what} path")
        raise OutputError(f"{what} directory does not exist: {parent}; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write the {what} to {parent}: permission denied")


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
) -> CompressReport:
    """Compress a model file and write the result atomically, only after it passes every check.

    Checks, on a temporary file next to the output: ``onnx.checker`` (full), an ONNX Runtime
    load, and (unless ``validation`` is None) the comparison against the original, which fails
    with :class:`ValidationFailed` (exit code 3) when ``validation.max_rel_error`` is exceeded; no
    model is written then. The report (if asked for) is written in every case that got that far.
    The compressed model is dropped from memory once written, before the checks load the file.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    report_path = Path(report_path) if report_path is not None else None
    _preflight_output(input_path, output_path, report_path)
    if validation is not None:  # fail on a bad provider or data file before the long part
        from onnxfactor.validation import resolve_providers

        resolve_providers(validation.provider)
        if validation.data is not None and not Path(validation.data).is_file():
            from onnxfactor.errors import UsageError

            raise UsageError(f"validation data file not found: {validation.data} (--data)")
    result = compress(input_path, config=config, input_shapes=input_shapes, progress=progress)
    report, external_data = result.report, result.external_data
    if not report.decomposed:
        report.warnings.append("no layer was decomposed: the output computes the same as the input")

    def check(tmp_path: Path) -> None:
        t = time.perf_counter()
        report.warnings.extend(check_written_model(tmp_path, original=input_path))
        report.timings["check"] = time.perf_counter() - t
        if validation is None:
            return
        t = time.perf_counter()
        vr = validate(input_path, tmp_path, options=validation, input_shapes=input_shapes)
        report.validation = vr.to_dict()
        report.timings["validate"] = time.perf_counter() - t
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
            _release_freed_memory()
            check(written.path)
            written.commit()
        report.output_path = str(output_path)
        report.totals.model_bytes_before = _file_bytes(input_path, external_data)
        report.totals.model_bytes_after = _file_bytes(output_path, external_data)
    finally:
        if report_path is not None:
            report.write_json(report_path)
    return report


def _file_bytes(path: Path, external_data: bool) -> int:
    """Size of a model file plus, for external-data models, the data files it references."""
    if not external_data:
        return path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    locations = set()
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).exists())


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Once the compressed model is written and dropped, the model (the largest object of the run)
    has been freed, but glibc keeps its pages, so the checks and ONNX Runtime sessions that follow
    would raise the peak RSS by their own size on top of it (see tools/bench_compress.py).
    """
    import gc

    gc.collect()  # the graphsurgeon graph is full of reference cycles and pins the original protobuf
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
