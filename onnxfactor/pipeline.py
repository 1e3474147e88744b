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
from onnxfactor.io import check_output_path
from onnxfactor.analysis import ConvSite, SkippedNode, find_conv_sites, infer_shapes, name_unnamed_nodes, record_shapes
from onnxfactor.config import CompressConfig
from onnxfactor.errors import InputModelError, NothingToCompress, OutputError, ValidationFailed, first_line
from onnxfactor.methods import AUTO, METHOD_CHOICES, METHODS, tucker2, tucker3
from onnxfactor.methods.base import ChainSpec
from onnxfactor.methods.cp import DegenerateFit
from onnxfactor.methods.search import CostModel
from onnxfactor.ranks.policies import RankChoice, load_rank_file
from onnxfactor.report import CompressReport, LayerReport, Totals
from onnxfactor.rewrite import Rewriter, export_model
from onnxfactor.speed import Candidate, Option, guard_end_to_end, meet_budget, select_faster_layers

#: Weakening levels of the VBMF ranks a latency budget chooses from, per layer (1.0 = plain VBMF).
BUDGET_LEVELS = (0.25, 0.5, 0.75, 1.0)

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
    shapes: dict


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
    return _Prepared(loaded, graph, sites, skipped, resolved, shapes)


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
        from onnxfactor.errors import UsageError

        if config.method not in METHOD_CHOICES:
            raise UsageError(f"unknown method {config.method!r}; choose one of {', '.join(METHOD_CHOICES)} (--method)")
        self.auto = config.method == AUTO
        self.runners_up: list[ChainSpec] = []  # auto: the other chains of the last search
        if self.auto and config.ranks.policy == "file":
            raise UsageError("a rank file gives the ranks of one method: choose --method tucker2, cp3, cp4 or tucker3 with --rank-file")
        if config.ranks.policy == "error" and not 0.0 <= config.ranks.target_error < 1.0:
            raise UsageError(f"--target-error must be in [0, 1), got {config.ranks.target_error:g}")
        self.config = config
        self.explicit = explicit
        # auto needs every method's spectra: spatial Tucker's are the superset (out, in, spatial)
        self.method = tucker3 if self.auto else METHODS[config.method]
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
        """The policy's ranks (for ``auto``: Tucker-2's, the reference), the weight and its spectra."""
        weight = np.asarray(site.weight_array(), dtype=np.float32)
        spectra = self.spectra(site, weight)
        entry = self.explicit.get(site.name) if self.explicit is not None else None
        if entry is not None and "in" in entry and not site.geometry.is_pointwise and not self.in_mode(site):
            entry = {**entry, "in": None}
        ranks = self.config.ranks
        if ranks.policy == "error":  # the rows of the report: VBMF ranks for reference, replaced later
            ranks = dataclasses.replace(ranks, policy="vbmf")
        if self.auto:
            return tucker2.choose_ranks(_spectra_for("tucker2", spectra), ranks, entry), weight, spectra
        return self.method.choose_ranks(spectra, ranks, entry), weight, spectra

    def run(self, site: ConvSite, *, variants: bool = False) -> tuple[LayerReport, list[ChainSpec]]:
        """Decide one site: its report row and, if it is to be decomposed, its chain options.

        The first option is the chosen chain; with ``variants`` its rank-rounded versions follow
        (see :func:`onnxfactor.speed.rounded_ranks`), for the latency-aware selection to time.
        Nothing is rewritten here.
        """
        start = time.perf_counter()
        self.runners_up = []
        layer = _layer_base(site)
        reason = _selection_reason(site, self.config, self.explicit)
        if reason is not None:
            layer.reason = reason
            return layer, []
        choice, weight, spectra = self.choose(site)
        if self.auto or self.config.ranks.policy == "error":
            chain, choice, layer.reason = self._search(site, weight, spectra, choice, layer)
        elif not choice.decomposes:
            chain, layer.reason = None, _kept_reason(choice)
        else:
            chain, choice, layer.reason, layer.fallback = self._decompose(site, weight, spectra, choice)
        layer.modes = [m.to_dict() for m in choice.modes]
        options = []
        if chain is not None:
            layer.describe_chain(chain, site.in_spatial, site.out_spatial)
            layer.reason = self._margin_reason(layer)
            if layer.reason is None:
                options = [chain] + (self._rounded_variants(site, weight, spectra, chain) if variants else [])
                if variants and self.auto:  # measured latency decides between the methods too
                    options += [c for c in self.runners_up if self._passes_margin(site, c)]
        layer.seconds = time.perf_counter() - start
        return layer, options

    def _rounded_variants(self, site: ConvSite, weight: np.ndarray, spectra, chain: ChainSpec) -> list[ChainSpec]:
        """``chain`` rebuilt with its ranks rounded up to multiples of 8 and 16 (same method), when
        that changes them and still passes the ``min_reduction`` margin; a degenerate CP fit is skipped."""
        from onnxfactor.speed import ROUNDING_STEPS, rounded_ranks

        method_name = {"svd": "tucker2"}.get(chain.method, chain.method)
        method = METHODS[method_name]
        o, i = site.out_per_group, site.in_per_group
        sizes = {"out": o, "in": i, "spatial": math.prod(site.geometry.kernel_shape),
                 "rank": min(o, i) if chain.method == "svd" else max(o, i) * math.prod(site.geometry.kernel_shape)}
        variants, seen = [], {tuple(sorted(chain.ranks.items()))}
        for step in ROUNDING_STEPS:
            ranks = rounded_ranks(chain.ranks, sizes, step)
            if ranks is None or tuple(sorted(ranks.items())) in seen:
                continue
            seen.add(tuple(sorted(ranks.items())))
            try:
                variant = method.decompose(weight, site.geometry, ranks, spectra=_spectra_for(method_name, spectra), hooi_iters=self.config.hooi_iters)
            except DegenerateFit:
                continue
            if self._passes_margin(site, variant):
                variants.append(variant)
        return variants

    def _passes_margin(self, site: ConvSite, chain: ChainSpec) -> bool:
        probe = _layer_base(site)
        probe.describe_chain(chain, site.in_spatial, site.out_spatial)
        return self._margin_reason(probe) is None

    def budget_options(self, candidates: list[Candidate], timer, opset: int | None) -> dict[str, list[Option]]:
        """Per timeable candidate, its chain at each weakening level of :data:`BUDGET_LEVELS` (and,
        with ``rank_search``, its rank-rounded variants), each timed against the Conv."""
        from onnxfactor.latency import time_chains

        levels = {}
        for c in candidates:
            site = c.site
            if site.graph_path or site.input_shape is None:
                continue
            found = []  # (level, chain)
            for level in BUDGET_LEVELS:
                ranks = dataclasses.replace(self.config.ranks, policy="weakened", weaken=level)
                sub = _LayerDecomposer(dataclasses.replace(self.config, ranks=ranks), self.explicit, [site])
                _, chains = sub.run(site, variants=self.config.latency.rank_search)
                found += [(level, chain) for chain in chains]
            timings = time_chains(timer, site, [chain for _, chain in found], opset=opset)
            levels[site.name] = [Option(level, chain, t) for (level, chain), t in zip(found, timings)]
        return levels

    def _decompose(self, site: ConvSite, weight: np.ndarray, spectra, choice: RankChoice):
        """The method's chain at the chosen ranks: ``(chain | None, choice, kept reason, fallback note)``."""
        try:
            chain = self.method.decompose(weight, site.geometry, choice.ranks, spectra=spectra, hooi_iters=self.config.hooi_iters)
            return chain, choice, None, None
        except DegenerateFit as e:
            chain, choice = self._fallback(weight, site, spectra)
            fallback = f"CP fit degenerate ({e.reason}); fell back to Tucker-2"
            reason = None if chain is not None else fallback + ": " + _kept_reason(choice)
            return chain, choice, reason, fallback

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

    def _search(self, site: ConvSite, weight: np.ndarray, spectra, choice: RankChoice, layer: LayerReport):
        """The cheapest chain meeting the error target (``error`` policy and/or ``auto``).

        Returns ``(chain | None, choice, kept reason)``; every method tried is recorded in
        ``layer.candidates`` with its ranks, error, MACs and search time.
        """
        cost = CostModel.of(site.weight_shape, site.geometry, site.in_spatial, site.out_spatial)
        step = self.config.ranks.round_to

        def macs(chain) -> int:  # the CostModel's unit: MACs, or parameters when sizes are unknown
            return chain.macs(cost.in_spatial, cost.out_spatial)

        def record(name: str, chain, seconds: float, note: str = "") -> None:
            entry = {"method": name, "seconds": round(seconds, 4), "note": note}
            if chain is not None:
                entry.update(chain=chain.method, ranks=dict(chain.ranks), rel_error=chain.rel_error, macs=macs(chain))
            layer.candidates.append(entry)

        best, target = None, self.config.ranks.target_error
        if self.config.ranks.policy != "error":  # auto: Tucker-2 at the policy's ranks sets the target
            if not choice.decomposes:
                return None, choice, _kept_reason(choice)
            t0 = time.perf_counter()
            best = tucker2.decompose(weight, site.geometry, choice.ranks, spectra=spectra, hooi_iters=self.config.hooi_iters)
            target = best.rel_error
            record("tucker2", best, time.perf_counter() - t0, f"{self.config.ranks.policy} ranks: the error target")
        names = list(METHODS) if self.auto else [self.config.method]
        if site.geometry.is_pointwise:  # every method's chain of a matrix is its truncated SVD
            names = names[:1]
        best_name = "tucker2" if best is not None else None
        self.runners_up = [best] if best is not None else []  # each chain that was the cheapest so far
        for name in names:
            t0 = time.perf_counter()
            max_cost = macs(best) if best is not None else None
            chain = METHODS[name].chain_for_error(
                weight, site.geometry, target, spectra=_spectra_for(name, spectra), cost=cost, max_cost=max_cost, step=step
            )
            found = chain is not None and (best is None or macs(chain) < macs(best))
            record(name, chain, time.perf_counter() - t0, "cheapest meeting the target" if chain is not None else "none meets the target below the cost to beat")
            if found:
                best, best_name = chain, name
                self.runners_up.append(chain)
        self.runners_up = [c for c in self.runners_up if c is not best]
        if best is None:
            what = "any method" if self.auto else self.config.method
            return None, choice, f"no {what} chain reaches relative error <= {target:.3g} with fewer MACs than the original"
        note = f"cheapest chain with relative error <= {target:.3g}" + (f" (auto: {best_name})" if self.auto else "")
        rows = METHODS[best_name].choose_ranks(_spectra_for(best_name, spectra), dataclasses.replace(self.config.ranks, policy="vbmf"), None)
        modes = [dataclasses.replace(m, rank=best.ranks.get(m.mode), note=note) for m in rows.modes]
        return best, RankChoice(dict(best.ranks), modes), None

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


def _spectra_for(name: str, spectra):
    """The view of the superset spectra (``auto``) that method ``name`` expects: Tucker-2 has no spatial mode."""
    if name == "tucker2" and getattr(spectra, "spatial", None) is not None:
        return dataclasses.replace(spectra, spatial=None)
    return spectra


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
    timer=None,
) -> CompressResult:
    """Decompose the Conv layers of ``model`` and return the rewritten model and a report.

    ``model`` is a path or a ``ModelProto`` (never modified). ``input_shapes`` fixes dynamic input
    dimensions for shape inference (MAC counts); see :func:`onnxfactor.validation.resolve_input_shapes`
    for the defaults. With ``config.latency`` set, layers are kept only where ONNX Runtime measures
    them faster and the model is guarded end to end (see :mod:`onnxfactor.speed`); ``timer``
    replaces the ONNX Runtime timer (:class:`onnxfactor.latency.Timer`, e.g. a fake one in tests).
    Nothing is written to disk; see :func:`compress_file`.
    """
    config = config or CompressConfig()
    timings = {}
    t0 = time.perf_counter()
    prep = _prepare(model, input_shapes)
    explicit = _load_explicit(config, prep.sites)
    timings["load_and_analyse"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    decomposer = _LayerDecomposer(config, explicit, prep.sites)
    measuring = config.latency is not None
    layers, candidates = [], []
    for index, site in enumerate(prep.sites):
        layer, options = decomposer.run(site, variants=measuring and config.latency.rank_search)
        layers.append(layer)
        if options:
            candidates.append(Candidate(site, layer, options))
        if progress is not None:
            progress(index + 1, len(prep.sites), site.name)
    timings["decompose"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    params_before = _model_params(prep.loaded.model)
    speed = None
    if measuring and candidates:
        t = time.perf_counter()
        out, speed = _measured_selection(prep, decomposer, candidates, config, timer, progress)
        timings["latency"] = time.perf_counter() - t
    else:
        out = _build(prep, candidates, in_place=True, hooi_iters=config.hooi_iters)
    timings["export"] = time.perf_counter() - t2 - timings.get("latency", 0.0)

    report = CompressReport(
        config=dataclasses.asdict(config),
        input_shapes={k: list(v) for k, v in prep.input_shapes.items()},
        layers=layers,
        skipped=[dataclasses.asdict(s) for s in prep.skipped],
        folded=list(prep.loaded.folded),
        totals=_totals(layers, params_before, _model_params(out)),
        timings=timings,
        input_path=str(prep.loaded.path) if prep.loaded.path else None,
        speed=speed,
    )
    if speed is not None and speed.get("warning"):
        report.warnings.append(speed["warning"])
    if not report.totals.macs_known:
        report.warnings.append("some Conv output shapes are unknown: MAC totals cover only the known layers (set --input-shape)")
    timings["total"] = time.perf_counter() - t0
    return CompressResult(out, report, external_data=prep.loaded.external_data)


def _apply(rewriter: Rewriter, candidate: Candidate, hooi_iters: int) -> list[str]:
    site, chain = candidate.site, candidate.chain
    share_key = (site.graph_path, site.weight.name, chain.method, tuple(sorted(chain.ranks.items())), hooi_iters)
    return rewriter.replace(site, chain, share_key)


def _build(prep: _Prepared, candidates: list[Candidate], *, in_place: bool, hooi_iters: int) -> onnx.ModelProto:
    """The model with every candidate's ``chain`` applied (``None``: kept); marks the report rows.

    ``in_place`` rewrites ``prep``'s graph and model (the final output: its unchanged weights are
    not copied again); otherwise a copy of the normalised model is rewritten, for timing a trial.
    """
    if in_place:
        graph, base, sites = prep.graph, prep.loaded.model, None
    else:  # the same sites, found again in the copy
        base = _copy(prep.loaded.model)
        graph = gs.import_onnx(base)
        name_unnamed_nodes(graph)
        sites = {(s.graph_path, s.name): s for s in find_conv_sites(graph, prep.shapes)[0]}
    rewriter = Rewriter(graph)
    for c in candidates:
        c.layer.new_nodes, c.layer.status = [], "kept"
        if c.chain is None:
            continue
        c.layer.reason = None
        site = c.site if sites is None else sites[(c.site.graph_path, c.site.name)]
        c.layer.new_nodes = _apply(rewriter, Candidate(site, c.layer, [c.chain]), hooi_iters)
        c.layer.status = "decomposed"
    out = export_model(graph, base)
    return model_io.restore_conventions(out, prep.loaded.ir_version)


def _measured_selection(prep: _Prepared, decomposer, candidates: list[Candidate], config: CompressConfig, timer, progress=None):
    """Per-layer timing, then the end-to-end guard or the latency budget; returns (model, speed dict)."""
    from onnxfactor.latency import OrtTimer
    from onnxfactor.validation import make_inputs, resolve_providers

    latency = config.latency
    providers = resolve_providers(latency.provider)
    timer = timer or OrtTimer(providers, latency.threads)
    opset = next((o.version for o in prep.loaded.model.opset_import if o.domain in ("", "ai.onnx")), None)
    # the normalised input stays unchanged on this path (trial and final models are copies), so it
    # is timed as it is unless IR < 4 needs its initializers listed as inputs again
    original = prep.loaded.model if prep.loaded.ir_version >= 4 else model_io.restore_conventions(_copy(prep.loaded.model), prep.loaded.ir_version)
    _require_loadable(original, providers)
    feeds = make_inputs(original, shapes=prep.input_shapes, seed=0).batches[0]
    speed = {"providers": providers, "threads": latency.threads, "margin": latency.margin}
    budget = latency.target_speedup is not None or latency.max_latency_ms is not None

    def build():
        return _build(prep, candidates, in_place=False, hooi_iters=config.hooi_iters)

    if budget:
        levels = decomposer.budget_options(candidates, timer, opset)
        result, met = meet_budget(
            candidates, levels, build, original, feeds, timer,
            target_speedup=latency.target_speedup, max_latency_ms=latency.max_latency_ms,
        )
        goal = f"{latency.target_speedup:g}x" if latency.target_speedup is not None else f"{latency.max_latency_ms:g} ms"
        if not met:
            last = result.rounds[-1]
            speed["warning"] = (
                f"latency budget {goal} is out of reach: the fastest model found runs {last['compressed_ms']:.3g} ms "
                f"against {last['original_ms']:.3g} ms ({last['speedup']:.2f}x) with every useful layer at its fastest option"
            )
            if last["speedup"] < 1.0 and not latency.allow_slower:  # never slower: the guard rolls back
                guarded = guard_end_to_end(candidates, build, original, feeds, timer, margin=latency.margin)
                result.rounds += guarded.rounds
                result.model = guarded.model
        speed.update(budget=goal, budget_met=met, **result.to_dict())
        return result.model, speed
    select_faster_layers(candidates, timer, margin=latency.margin, opset=opset,
                         progress=(lambda d, n, name: progress(d, n, f"timing {name}")) if progress else None)
    if not latency.guard:
        return _build(prep, candidates, in_place=True, hooi_iters=config.hooi_iters), speed
    result = guard_end_to_end(
        candidates, build, original, feeds, timer, allow_slower=latency.allow_slower, margin=latency.margin
    )
    speed.update(result.to_dict())
    if result.speedup is not None and result.speedup < 1.0 + latency.margin and result.rounds[-1]["layers"]:
        speed["warning"] = f"the compressed model measured {result.speedup:.2f}x as fast as the original (kept: --allow-slower)"
    return result.model, speed


def _require_loadable(model: onnx.ModelProto | Path, providers: list[str]) -> None:
    """Raise :class:`InputModelError` when ONNX Runtime cannot load the input model (a model or its file)."""
    from onnxfactor.validation.providers import make_session

    try:
        make_session(model, providers)
    except Exception as e:  # noqa: BLE001 - ORT raises its own types
        raise InputModelError(f"ONNX Runtime cannot load the input model: {first_line(e)}; fix the input model first") from None


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


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
    layers = [decomposer.run(site)[0] for site in prep.sites]
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
        if original is not None:  # e.g. a weight whose type does not match its Conv input
            _require_loadable(original, ["CPUExecutionProvider"])
        raise OutputError(f"ONNX Runtime cannot load the rewritten model: {first_line(e)}") from None
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
