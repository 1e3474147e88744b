"""Per-layer decisions: selection, rank choice, method (and ``auto``'s search), CP fallback, margins.

:class:`LayerDecomposer` turns one :class:`~onnxfactor.analysis.ConvSite` into its report row
and its chain options (first = chosen, then rank-rounded variants and ``auto``'s runners-up for
the measured selection). Every chain is fitted through the layer's
:class:`~onnxfactor.calibration.fit.LayerFit`: to the weight, or, with calibration data, to the
layer's output on it (``--fit data``). It never rewrites the graph: :mod:`onnxfactor.rewrite` does that.

With calibration data the ``error`` policy's target is the layer's *measured* output error on the
calibration tiles: the search runs on the fit's own error (the whitened weight's, a proxy that
takes kernel offsets as independent), the cheapest chain is measured, and the proxy target is
rescaled by ``target / measured`` for up to :data:`ERROR_ROUNDS` rounds; the cheapest chain
whose measured error meets the target wins.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter

import numpy as np

from onnxfactor.analysis import ConvSite
from onnxfactor.calibration.fit import DataFit, LayerFit
from onnxfactor.config import CompressConfig
from onnxfactor.errors import UsageError
from onnxfactor.methods import AUTO, METHOD_CHOICES, METHODS
from onnxfactor.methods.base import ChainSpec
from onnxfactor.methods.cp import DegenerateFit
from onnxfactor.methods.search import CostModel
from onnxfactor.ranks.policies import RankChoice
from onnxfactor.report import LayerReport
from onnxfactor.speed import Candidate, Option

#: Weakening levels of the VBMF ranks a latency budget chooses from, per layer (1.0 = plain VBMF).
BUDGET_LEVELS = (0.25, 0.5, 0.75, 1.0)
#: Measured rounds of the ``error`` policy's search with calibration data (module docstring).
ERROR_ROUNDS = 6

def selection_reason(site: ConvSite, config: CompressConfig, explicit: dict | None) -> str | None:
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


class LayerDecomposer:
    """Ranks and decomposes sites; a weight shared by several Convs is analysed once (weight fits).

    ``calibration`` (:class:`onnxfactor.calibration.statistics.CalibrationData`) makes every site
    with statistics fit to its data (``config.calibration.fit == "data"``) or at least measure its
    output error (``"weights"``).
    """

    def __init__(self, config: CompressConfig, explicit: dict | None, sites: list[ConvSite], calibration=None):
        if config.method not in METHOD_CHOICES:
            raise UsageError(f"unknown method {config.method!r}; choose one of {', '.join(METHOD_CHOICES)} (--method)")
        self.auto = config.method == AUTO
        self.runners_up: list[ChainSpec] = []  # auto: the other chains of the last search
        if config.ranks.policy == "error" and not 0.0 <= config.ranks.target_error < 1.0:
            raise UsageError(f"--target-error must be in [0, 1), got {config.ranks.target_error:g}")
        self.config = config
        self.explicit = explicit
        self.calibration = calibration
        self.method = METHODS.get(config.method)
        self._fits: dict[tuple, LayerFit] = {}
        # Rank-file entries that name their own method (per-layer methods, the search's allocation):
        # those sites are decided by a decomposer of that method.
        methods = getattr(explicit, "methods", {})
        own = {s.name: methods[s.name] for s in sites if methods.get(s.name, config.method) != config.method}
        self._delegates = {m: LayerDecomposer(dataclasses.replace(config, method=m), explicit,
                                              [s for s in sites if own.get(s.name) == m], calibration)
                           for m in sorted(set(own.values()))}
        self._own = own
        # Spectra hold C x C eigenvector matrices (about the model's size in total): keep a fit only
        # until the last Conv sharing it has been processed.
        self._users = Counter(self._key(site) for site in sites if site.name not in own)

    def in_mode(self, site: ConvSite) -> bool:
        return site.in_per_group > self.config.in_mode_min_channels

    def _stats(self, site: ConvSite):
        if self.calibration is None or site.graph_path:
            return None
        return self.calibration.layers.get(site.name)

    def _key(self, site: ConvSite) -> tuple:
        if self._stats(site) is not None:  # fitted or measured on this Conv's own inputs
            return ("site", site.graph_path, site.name)
        return (site.graph_path, site.weight.name, site.geometry.group, self.in_mode(site))

    def make_fit(self, site: ConvSite) -> LayerFit:
        """A new :class:`LayerFit` of ``site`` (data-aware when it has statistics and ``fit`` is ``data``)."""
        weight = np.asarray(site.weight_array(), dtype=np.float32)
        stats = self._stats(site)
        family = self.config.method
        if stats is not None and self.config.calibration.fit == "data":
            return DataFit(weight, site.geometry, stats, in_mode=self.in_mode(site), family=family, ridge=self.config.calibration.ridge)
        note = self.calibration.notes.get(site.name) if self.calibration is not None else None
        return LayerFit(weight, site.geometry, in_mode=self.in_mode(site), family=family, stats=stats, note=note)

    def fit_for(self, site: ConvSite) -> LayerFit:
        """The site's fit, shared with the other Convs of the same weight (weight fits), released after its last user."""
        key = self._key(site)
        fit = self._fits.get(key) or self.make_fit(site)
        self._users[key] -= 1
        if self._users[key] > 0:
            self._fits[key] = fit
        else:
            self._fits.pop(key, None)
        return fit

    def choose(self, site: ConvSite, fit: LayerFit) -> RankChoice:
        """The policy's ranks (for ``auto``: Tucker-2's, the reference)."""
        entry = self.explicit.get(site.name) if self.explicit is not None else None
        if entry is not None and "in" in entry and not site.geometry.is_pointwise and not self.in_mode(site):
            entry = {**entry, "in": None}
        ranks = self.config.ranks
        if ranks.policy == "error":  # the rows of the report: VBMF ranks for reference, replaced later
            ranks = dataclasses.replace(ranks, policy="vbmf")
        name = "tucker2" if self.auto else self.config.method
        return METHODS[name].choose_ranks(fit.spectra(name), ranks, entry)

    def run(self, site: ConvSite, *, variants: bool = False, fit: LayerFit | None = None) -> tuple[LayerReport, list[ChainSpec]]:
        """Decide one site: its report row and, if it is to be decomposed, its chain options.

        The first option is the chosen chain; with ``variants`` its rank-rounded versions follow
        (see :func:`onnxfactor.speed.rounded_ranks`), for the latency-aware selection to time.
        ``fit`` reuses a :class:`LayerFit` (the latency budget decides one site several times).
        Nothing is rewritten here.
        """
        if site.name in self._own:
            return self._delegates[self._own[site.name]].run(site, variants=variants, fit=fit)
        start = time.perf_counter()
        self.runners_up = []
        layer = _layer_base(site)
        reason = selection_reason(site, self.config, self.explicit)
        if reason is not None:
            layer.reason = reason
            return layer, []
        fit = fit or self.fit_for(site)
        layer.fit = fit.fit
        if fit.note:
            layer.fit_note = fit.note
        choice = self.choose(site, fit)
        if self.auto or self.config.ranks.policy == "error":
            chain, choice, layer.reason = self._search(site, fit, choice, layer)
        elif not choice.decomposes:
            chain, layer.reason = None, _kept_reason(choice)
        else:
            chain, choice, layer.reason, layer.fallback = self._decompose(site, fit, choice)
        layer.modes = [m.to_dict() for m in choice.modes]
        options = []
        if chain is not None:
            if chain.output_error is None:
                chain = fit.measure(chain)
            layer.describe_chain(chain, site.in_spatial, site.out_spatial)
            layer.reason = self._margin_reason(layer)
            if layer.reason is None:
                options = [chain] + (self._rounded_variants(site, fit, chain) if variants else [])
                if variants and self.auto:  # measured latency decides between the methods too
                    options += [fit.measure(c) for c in self.runners_up if self._passes_margin(site, c)]
        layer.seconds = time.perf_counter() - start
        return layer, options

    def _rounded_variants(self, site: ConvSite, fit: LayerFit, chain: ChainSpec) -> list[ChainSpec]:
        """``chain`` rebuilt with its ranks rounded up to multiples of 8 and 16 (same method), when
        that changes them and still passes the ``min_reduction`` margin; a degenerate CP fit is skipped."""
        from onnxfactor.speed import ROUNDING_STEPS, rounded_ranks

        method_name = {"svd": "tucker2"}.get(chain.method, chain.method)
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
                variant = fit.decompose(method_name, ranks, hooi_iters=self.config.hooi_iters)
            except DegenerateFit:
                continue
            if self._passes_margin(site, variant):
                variants.append(fit.measure(variant))
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
            fit = self.make_fit(site)
            found = []  # (level, chain)
            for level in BUDGET_LEVELS:
                ranks = dataclasses.replace(self.config.ranks, policy="weakened", weaken=level)
                sub = LayerDecomposer(dataclasses.replace(self.config, ranks=ranks), self.explicit, [site], self.calibration)
                _, chains = sub.run(site, variants=self.config.latency.rank_search, fit=fit)
                found += [(level, chain) for chain in chains]
            fit.release()
            timings = time_chains(timer, site, [chain for _, chain in found], opset=opset)
            levels[site.name] = [Option(level, chain, t) for (level, chain), t in zip(found, timings)]
        return levels

    def _decompose(self, site: ConvSite, fit: LayerFit, choice: RankChoice):
        """The method's chain at the chosen ranks: ``(chain | None, choice, kept reason, fallback note)``."""
        try:
            chain = fit.decompose(self.config.method, choice.ranks, hooi_iters=self.config.hooi_iters)
            return chain, choice, None, None
        except DegenerateFit as e:
            chain, choice = self._fallback(fit)
            fallback = f"CP fit degenerate ({e.reason}); fell back to Tucker-2"
            reason = None if chain is not None else fallback + ": " + _kept_reason(choice)
            return chain, choice, reason, fallback

    def _fallback(self, fit: LayerFit):
        """Tucker-2 in place of a degenerate CP fit (the CP spectra include Tucker-2's two modes)."""
        ranks = self.config.ranks
        if ranks.policy == "file":  # a CP rank-file entry is not a Tucker-2 entry: use VBMF
            ranks = dataclasses.replace(ranks, policy="vbmf")
        choice = METHODS["tucker2"].choose_ranks(fit.spectra("tucker2"), ranks, None)
        if not choice.decomposes:
            return None, choice
        return fit.decompose("tucker2", choice.ranks, hooi_iters=self.config.hooi_iters), choice

    def _search(self, site: ConvSite, fit: LayerFit, choice: RankChoice, layer: LayerReport):
        """The cheapest chain meeting the error target (``error`` policy and/or ``auto``).

        Returns ``(chain | None, choice, kept reason)``; every method tried is recorded in
        ``layer.candidates`` with its ranks, error, MACs and search time. With calibration data
        the ``error`` policy's target is the measured output error (module docstring).
        """
        cost = CostModel.of(site.weight_shape, site.geometry, site.in_spatial, site.out_spatial)

        def macs(chain) -> int:  # the CostModel's unit: MACs, or parameters when sizes are unknown
            return chain.macs(cost.in_spatial, cost.out_spatial)

        target = self.config.ranks.target_error
        reference = None
        if self.config.ranks.policy != "error":  # auto: Tucker-2 at the policy's ranks sets the target
            if not choice.decomposes:
                return None, choice, _kept_reason(choice)
            t0 = time.perf_counter()
            reference = fit.decompose("tucker2", choice.ranks, hooi_iters=self.config.hooi_iters)
            target = reference.rel_error
            self._record(layer, "tucker2", reference, time.perf_counter() - t0, macs, f"{self.config.ranks.policy} ranks: the error target")
        if self.config.ranks.policy == "error" and fit.measures:
            best, best_name, target_note = self._measured_search(site, fit, target, cost, macs, layer)
        else:
            best, best_name = self._cheapest(site, fit, target, reference, cost, macs, layer)
            target_note = f"relative error <= {target:.3g}"
        if best is None:
            what = "any method" if self.auto else self.config.method
            return None, choice, f"no {what} chain reaches {target_note} with fewer MACs than the original"
        note = f"cheapest chain with {target_note}" + (f" (auto: {best_name})" if self.auto else "")
        rows = METHODS[best_name].choose_ranks(fit.spectra(best_name), dataclasses.replace(self.config.ranks, policy="vbmf"), None)
        modes = [dataclasses.replace(m, rank=best.ranks.get(m.mode), note=note) for m in rows.modes]
        return best, RankChoice(dict(best.ranks), modes), None

    @staticmethod
    def _record(layer: LayerReport, name: str, chain, seconds: float, macs, note: str = "") -> None:
        entry = {"method": name, "seconds": round(seconds, 4), "note": note}
        if chain is not None:
            entry.update(chain=chain.method, ranks=dict(chain.ranks), rel_error=chain.rel_error, macs=macs(chain))
            if chain.output_error is not None:
                entry["output_error"] = chain.output_error
        layer.candidates.append(entry)

    def _cheapest(self, site, fit: LayerFit, target: float, reference, cost, macs, layer) -> tuple[ChainSpec | None, str | None]:
        """Every method's cheapest chain with the fit's error ``<= target``; the cheapest wins.

        ``reference`` (auto) is Tucker-2's chain at the policy's ranks, the chain to beat. Sets
        :attr:`runners_up` to the chains that were the cheapest so far on the way.
        """
        names = list(METHODS) if self.auto else [self.config.method]
        if site.geometry.is_pointwise:  # every method's chain of a matrix is its truncated SVD
            names = names[:1]
        best, best_name = reference, ("tucker2" if reference is not None else None)
        self.runners_up = [best] if best is not None else []  # each chain that was the cheapest so far
        for name in names:
            t0 = time.perf_counter()
            max_cost = macs(best) if best is not None else None
            chain = fit.chain_for_error(name, target, cost=cost, max_cost=max_cost, step=self.config.ranks.round_to)
            found = chain is not None and (best is None or macs(chain) < macs(best))
            self._record(layer, name, chain, time.perf_counter() - t0, macs,
                         "cheapest meeting the target" if chain is not None else "none meets the target below the cost to beat")
            if found:
                best, best_name = chain, name
                self.runners_up.append(chain)
        self.runners_up = [c for c in self.runners_up if c is not best]
        return best, best_name

    def _measured_search(self, site, fit: LayerFit, target: float, cost, macs, layer):
        """The ``error`` policy with calibration data: the cheapest chain whose *measured* output
        error is ``<= target``, searched on the fit's error with a rescaled target (module docstring)."""
        proxy, best, best_name, measured = target, None, None, {}
        for _ in range(ERROR_ROUNDS):
            chain, name = self._cheapest(site, fit, proxy, None, cost, macs, layer)
            if chain is None:  # nothing cheaper than the original at this proxy: a looser one may find one
                if proxy >= 0.999 or best is not None:
                    break
                proxy = min(0.999, proxy * 1.5)
                continue
            key = (chain.method, tuple(sorted(chain.ranks.items())))
            if key not in measured:
                chain = fit.measure(chain)
                measured[key] = chain.output_error
                layer.candidates.append({"method": name, "chain": chain.method, "ranks": dict(chain.ranks), "macs": macs(chain),
                                         "rel_error": chain.rel_error, "output_error": chain.output_error,
                                         "note": f"measured; searched at the fit's error <= {proxy:.3g}"})
            error = measured[key]
            feasible = error <= target
            if feasible and (best is None or macs(chain) < macs(best)):
                best, best_name = fit.measure(chain) if chain.output_error is None else chain, name
            ratio = target / error if error > 0 else 2.0
            if feasible and ratio < 1.05:
                break  # within 5 % of the target: a looser proxy would break it
            if feasible:  # try a cheaper chain
                proxy = min(0.999, proxy * min(2.0, max(1.05, ratio)))
            else:  # a more accurate one: below this chain's own error at least
                proxy = min(proxy * max(0.5, ratio), (chain.rel_error or proxy) * (1 - 1e-3))
        self.runners_up = []
        return best, best_name, f"output error <= {target:.3g} on the calibration data"

    def _margin_reason(self, layer: LayerReport) -> str | None:
        return margin_reason(layer, self.config.min_reduction)


def margin_reason(layer: LayerReport, min_reduction: float | None) -> str | None:
    """Why ``layer``'s chain is not worth it: its parameters or MACs drop by less than ``min_reduction`` (None: it is)."""
    m = min_reduction
    if m is None:
        return None
    cuts = {"params": 1 - layer.params_after / layer.params_before}
    if layer.macs_before and layer.macs_after is not None:
        cuts["MACs"] = 1 - layer.macs_after / layer.macs_before
    short = [f"{k} {v:+.0%}" for k, v in cuts.items() if v < m]
    if short:
        return f"chain would change {', '.join(short)}; needs a cut of at least {m:.0%} (--min-reduction)"
    return None
