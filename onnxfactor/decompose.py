"""Per-layer decisions: selection, rank choice, method (and ``auto``'s search), CP fallback, margins.

:class:`LayerDecomposer` turns one :class:`~onnxfactor.analysis.ConvSite` into its report row
and its chain options (first = chosen, then rank-rounded variants and ``auto``'s runners-up for
the measured selection). It never rewrites the graph: :mod:`onnxfactor.rewrite` does that.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter

import numpy as np

from onnxfactor.analysis import ConvSite
from onnxfactor.config import CompressConfig
from onnxfactor.errors import UsageError
from onnxfactor.methods import AUTO, METHOD_CHOICES, METHODS, tucker2, tucker3
from onnxfactor.methods.base import ChainSpec
from onnxfactor.methods.cp import DegenerateFit
from onnxfactor.methods.search import CostModel
from onnxfactor.ranks.policies import RankChoice
from onnxfactor.report import LayerReport
from onnxfactor.speed import Candidate, Option

#: Weakening levels of the VBMF ranks a latency budget chooses from, per layer (1.0 = plain VBMF).
BUDGET_LEVELS = (0.25, 0.5, 0.75, 1.0)

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


class LayerDecomposer:
    """Ranks and decomposes sites, caching spectra per weight (a shared weight is analysed once)."""

    def __init__(self, config: CompressConfig, explicit: dict | None, sites: list[ConvSite]):
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
                sub = LayerDecomposer(dataclasses.replace(self.config, ranks=ranks), self.explicit, [site])
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
