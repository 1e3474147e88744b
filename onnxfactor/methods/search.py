"""The cheapest chain for a target reconstruction error: the ``error`` rank policy and ``--method auto``.

Cost is the chain's MACs per sample at the layer's analysed input and output sizes (parameters
when the sizes are unknown: both sizes taken as 1), by the same count as
:meth:`~onnxfactor.methods.base.ChainSpec.macs`, but as closed formulas of the ranks so that whole
rank grids are costed at once (:class:`CostModel`).

Tucker methods (``tucker2``, ``tucker3``, and the SVD of pointwise convs) are exhaustive and
exact: the truncated HOSVD at ranks ``(r_0, r_1, ..)`` is an orthogonal projection, so its error
follows from the energy of the leading ``r_0 x r_1 x ..`` block of the weight rotated onto the
full singular bases of its unfoldings, ``||W||^2 - ||G[:r_0, :r_1, ..]||^2``. One rotation and a
cumulative sum over each axis give the error of every rank combination; the cheapest combination
meeting the target is taken (ties: the lower error). A rank equal to its mode size means "mode
not decomposed", as everywhere else. CP ranks are searched by fitting
(:func:`onnxfactor.methods.cp.chain_for_error`).

``--method auto``: per layer, the target
is Tucker-2's relative error at the configured policy's ranks (VBMF by default), or the
configured ``target_error`` under the ``error`` policy; every method proposes its cheapest chain
meeting that target, each search bounded by the cheapest cost found so far (so a CP search that
cannot win stops on its Eckart-Young bound without fitting), and the cheapest chain wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnxfactor.methods.base import ChainSpec, ConvGeometry
from onnxfactor.methods.tucker2 import as_three_way, group_slices
from onnxfactor.spectral import WeightSpectra, tail_energy


@dataclass(frozen=True)
class CostModel:
    """MACs per sample of each method's chain as a function of its ranks (numpy-vectorised).

    ``group``, ``out_per_group`` (o), ``in_per_group`` (i), ``taps`` (K = prod(kernel)) describe
    the weight; ``in_spatial`` / ``out_spatial`` the number of input / output positions.
    """

    group: int
    out_per_group: int
    in_per_group: int
    kernel: tuple[int, ...]
    in_spatial: int = 1
    out_spatial: int = 1

    @classmethod
    def of(cls, weight_shape, geometry: ConvGeometry, in_spatial: int | None, out_spatial: int | None) -> "CostModel":
        g = geometry.group
        s_in, s_out = (in_spatial, out_spatial) if in_spatial and out_spatial else (1, 1)
        return cls(g, int(weight_shape[0]) // g, int(weight_shape[1]), tuple(geometry.kernel_shape), int(s_in), int(s_out))

    @property
    def taps(self) -> int:
        return math.prod(self.kernel)

    def original(self) -> int:
        return self.group * self.out_per_group * self.in_per_group * self.taps * self.out_spatial

    def svd(self, rank):
        """Pointwise conv ``W = B A``: both convs at the output positions."""
        return self.group * np.asarray(rank) * (self.in_per_group + self.out_per_group) * self.out_spatial

    def tucker2(self, r_out, r_in):
        """``in`` conv (at input positions, absent when ``r_in = i``), core, ``out`` (absent when ``r_out = o``)."""
        g, o, i = self.group, self.out_per_group, self.in_per_group
        r_out, r_in = np.asarray(r_out), np.asarray(r_in)
        first = np.where(r_in < i, i * r_in * self.in_spatial, 0)
        last = np.where(r_out < o, r_out * o * self.out_spatial, 0)
        return g * (first + r_out * r_in * self.taps * self.out_spatial + last)

    def tucker3(self, r_out, r_in, r_s):
        """``in`` conv, depthwise with multiplier ``r_s``, then the folded or split output (see tucker3)."""
        g, o, i = self.group, self.out_per_group, self.in_per_group
        r_out, r_in, r_s = np.asarray(r_out), np.asarray(r_in), np.asarray(r_s)
        mid = r_in * r_s
        first = np.where(r_in < i, i * r_in * self.in_spatial, 0)
        split = (r_out < o) & (r_out * (mid + o) < o * mid)
        last = np.where(split, r_out * (mid + o), o * mid)
        return g * (first + (mid * self.taps + last) * self.out_spatial)

    def cp_per_rank(self, variant: str) -> float:
        """MACs per unit of CP rank; CP-4's per-axis convs are counted at the smaller resolution
        (a lower bound, so a rank cap derived from it never excludes a cheaper chain)."""
        g, o, i = self.group, self.out_per_group, self.in_per_group
        if variant == "cp3":
            middle = self.taps * self.out_spatial
        else:
            middle = sum(k for k in self.kernel if k > 1) * min(self.in_spatial, self.out_spatial)
        return g * (i * self.in_spatial + middle + o * self.out_spatial)


def _rotated_energy(weight: np.ndarray, geometry: ConvGeometry, spectra: WeightSpectra, modes: tuple[str, ...]) -> tuple[np.ndarray, float]:
    """Energies of the weight rotated onto the full singular bases of ``modes``, summed over groups.

    Returns ``(E, ||W||^2)`` with ``E`` of shape ``(o, i, K)``; a mode not in ``modes`` is not
    rotated and is summed out (its axis has size 1).
    """
    bases = {"out": spectra.out, "in": spectra.in_, "spatial": spectra.spatial}
    total, energy = 0.0, None
    for gi, wg in enumerate(group_slices(np.asarray(weight), geometry.group)):
        t = as_three_way(wg.astype(np.float64))
        total += float(np.sum(t**2))
        for axis, mode in enumerate(("out", "in", "spatial")):
            if mode in modes:
                t = np.moveaxis(np.tensordot(t, bases[mode][gi].vectors, axes=([axis], [0])), -1, axis)
        e = t**2
        for axis, mode in enumerate(("out", "in", "spatial")):
            if mode not in modes:
                e = e.sum(axis=axis, keepdims=True)
        energy = e if energy is None else energy + e
    return energy, total


def _grid_errors(energy: np.ndarray, total: float) -> np.ndarray:
    """Relative error of every rank combination: ``err[a, b, c]`` at ranks ``(a + 1, b + 1, c + 1)``."""
    kept = energy.cumsum(0).cumsum(1).cumsum(2)
    if total <= 0:
        return np.zeros_like(kept)
    return np.sqrt(np.clip(total - kept, 0.0, None) / total)


def _rank_axis(size: int, step: int) -> np.ndarray:
    """Candidate ranks of one mode: multiples of ``step`` below ``size``, and ``size`` (mode kept)."""
    ranks = np.arange(step, size, step) if step > 1 else np.arange(1, size)
    return np.append(ranks, size)


def _cheapest(errors: np.ndarray, costs: np.ndarray, target: float, max_cost: float | None) -> tuple | None:
    """Index of the cheapest entry with error <= target (ties: lower error), cost < max_cost."""
    ok = errors <= target + 1e-12
    if max_cost is not None:
        ok &= costs < max_cost
    if not ok.any():
        return None
    flat = np.flatnonzero(ok)
    order = np.lexsort((errors.ravel()[flat], costs.ravel()[flat]))
    return np.unravel_index(flat[order[0]], errors.shape)


def tucker_chain_for_error(
    decompose,
    weight: np.ndarray,
    geometry: ConvGeometry,
    target: float,
    *,
    spectra: WeightSpectra,
    cost: CostModel,
    max_cost: float | None = None,
    step: int = 1,
    spatial: bool = False,
) -> ChainSpec | None:
    """The cheapest Tucker-2 (``spatial=False``) or spatial-Tucker chain with error ``<= target``.

    ``decompose`` is the method's ``decompose`` (``tucker2`` or ``tucker3``), which builds the chain
    at the chosen ranks. The input mode is searched only when ``spectra.in_`` exists (few
    input channels: ``r_in`` stays full). Ranks are multiples of ``step`` (or the full size). None
    when no decomposing combination meets the target below ``max_cost`` (or the original's cost).
    """
    o, i, k = cost.out_per_group, cost.in_per_group, cost.taps
    limit = cost.original() if max_cost is None else min(max_cost, cost.original())
    if geometry.is_pointwise:
        return _svd_chain_for_error(decompose, weight, geometry, target, spectra=spectra, cost=cost, max_cost=limit, step=step)
    modes = ("out",) + (("in",) if spectra.in_ is not None else ()) + (("spatial",) if spatial else ())
    energy, total = _rotated_energy(weight, geometry, spectra, modes)
    errors = _grid_errors(energy, total)
    r_out = _rank_axis(o, step)
    r_in = _rank_axis(i, step) if "in" in modes else np.array([i])
    r_s = _rank_axis(k, 1) if spatial else np.array([k])
    errors = errors[np.ix_(r_out - 1, r_in - 1 if "in" in modes else [0], r_s - 1 if spatial else [0])]
    ro, ri, rs = np.meshgrid(r_out, r_in, r_s, indexing="ij")
    costs = cost.tucker3(ro, ri, rs) if spatial else cost.tucker2(ro, ri)
    costs = np.where((ro == o) & (ri == i) & (rs == k), np.inf, costs)  # nothing decomposed
    best = _cheapest(errors, costs, target, limit)
    if best is None:
        return None
    a, b, c = (int(x) for x in best)

    def mode_rank(value: int, size: int) -> int | None:
        return None if value >= size else value

    ranks = {"out": mode_rank(int(r_out[a]), o), "in": mode_rank(int(r_in[b]), i)}
    if spatial:
        ranks["spatial"] = mode_rank(int(r_s[c]), k)
    return decompose(weight, geometry, ranks, spectra=spectra)


def _svd_chain_for_error(decompose, weight, geometry, target, *, spectra, cost, max_cost, step) -> ChainSpec | None:
    """Smallest SVD rank (a multiple of ``step``) meeting ``target`` for a pointwise conv (Eckart-Young)."""
    sq = sum(s.singular_values.astype(np.float64) ** 2 for s in spectra.matrix)
    total = float(sq.sum())
    tail = tail_energy(sq)  # tail[r] = error^2 of rank r
    ranks = _rank_axis(sq.size, step)
    errors = np.sqrt(np.clip(tail[ranks], 0.0, None) / total) if total > 0 else np.zeros(ranks.size)
    best = _cheapest(errors, cost.svd(ranks).astype(float), target, max_cost)
    if best is None:
        return None
    return decompose(weight, geometry, {"rank": int(ranks[best[0]])}, spectra=spectra)
