"""Spatial Tucker ("tucker3"): Tucker on the 3-way weight ``O x I x K`` (``K = prod(kernel)``).

    W[o, i, k] ~= sum_{a, b, c} G[a, b, c] U[o, a] V[i, b] S[k, c],
    U: O x R_out,  V: I x R_in,  S: K x R_s,  G = W x_0 U^T x_1 V^T x_2 S^T,

with ``U``, ``V``, ``S`` the leading left singular vectors of the three unfoldings (truncated
HOSVD; L. De Lathauwer, B. De Moor, J. Vandewalle, "A multilinear singular value decomposition",
SIAM J. Matrix Anal. Appl. 21, 2000), optionally refined by HOOI sweeps (tensorly). Compared with
Tucker-2 the ``R_in -> R_out`` k x k core conv is replaced by a depthwise conv with a small
spatial basis. The layer becomes

    1x1 (C_in -> R_in, weight V^T)
    ->  depthwise k x k, channel multiplier R_s (R_in -> R_in R_s; output channel b R_s + c
        applies the kernel S[:, c] to channel b; original geometry)
    ->  1x1 (R_in R_s -> C_out, weight U G_(0), original bias).

``U`` folded into the core costs ``C_out R_in R_s`` weights whatever ``R_out`` is, so when it is
cheaper, ``R_out (R_in R_s + C_out) < C_out R_in R_s``, the last conv is split into
``1x1 (R_in R_s -> R_out, weight G_(0))`` and ``1x1 (R_out -> C_out, weight U, bias)``; that is
what makes ``R_out`` worth choosing.

A mode whose rank is ``None`` is not truncated (factor = identity): no input conv for ``in``,
the full ``K`` taps for ``spatial`` (one-hot kernels), no output factor for ``out``. The first
conv is pointwise without bias, so the chain is exact for any strides, pads, dilations and
auto_pad. Grouped convs are decomposed group by group with one common rank set (block-diagonal
factors). Pointwise convs get Tucker-2's SVD chain.
"""

from __future__ import annotations

import numpy as np

from onnxfactor import _tensorly
from onnxfactor.config import RankConfig
from onnxfactor.methods import tucker2
from onnxfactor.methods.base import ChainSpec, ConvGeometry, ConvSpec
from onnxfactor.methods.tucker2 import as_three_way, group_slices
from onnxfactor.ranks import policies
from onnxfactor.spectral import WeightSpectra


def weight_spectra(weight: np.ndarray, geometry: ConvGeometry, *, in_mode: bool = True) -> WeightSpectra:
    """Spectra of the ``O x IK``, ``I x OK`` (if ``in_mode``) and ``K x OI`` unfoldings per group."""
    return tucker2.weight_spectra(weight, geometry, in_mode=in_mode, spatial_mode=True)


def choose_ranks(spectra: WeightSpectra, config: RankConfig, explicit: dict | None = None) -> policies.RankChoice:
    """``{"out", "in", "spatial"}`` each by the configured policy on its unfolding (see policies)."""
    return policies.choose_ranks(spectra, config, explicit)


def decompose(
    weight: np.ndarray,
    geometry: ConvGeometry,
    ranks: dict,
    *,
    spectra: WeightSpectra | None = None,
    hooi_iters: int = 0,
) -> ChainSpec:
    """Build the spatial-Tucker chain at ``ranks = {"out": .., "in": .., "spatial": ..}``.

    Ranks may be ``None`` (mode not truncated) or equal the mode size (exact). Pointwise convs take
    ``{"rank": R}`` (truncated SVD).
    """
    w = np.asarray(weight, dtype=np.float32)
    r_out, r_in, r_s = ranks.get("out"), ranks.get("in"), ranks.get("spatial")
    if geometry.is_pointwise:
        return tucker2.decompose(w, geometry, {"rank": ranks["rank"]}, spectra=spectra)
    if spectra is None or spectra.spatial is None or (r_in is not None and spectra.in_ is None):
        spectra = weight_spectra(w, geometry, in_mode=r_in is not None)

    g = geometry.group
    groups = group_slices(w, g)
    o, i = groups[0].shape[:2]
    kernel = geometry.kernel_shape
    k = int(np.prod(kernel))
    if r_out is None and r_in is None and r_s is None:
        raise ValueError("spatial Tucker needs at least one decomposed mode (all ranks are None)")
    for name, r, size in (("output-mode", r_out, o), ("input-mode", r_in, i), ("spatial-mode", r_s, k)):
        if r is not None:
            tucker2._check_rank(name, r, size)
    eff_out, eff_in, eff_s = r_out or o, r_in or i, r_s or k

    ins, taps, outs = [], [], []
    sq_norm, sq_kept = 0.0, 0.0
    for gi, wg in enumerate(groups):
        t = as_three_way(wg.astype(np.float64))
        factors = {
            0: spectra.out[gi].vectors[:, :r_out] if r_out is not None else None,
            1: spectra.in_[gi].vectors[:, :r_in] if r_in is not None else None,
            2: spectra.spatial[gi].vectors[:, :r_s] if r_s is not None else None,
        }
        truncated = {m: f.shape[1] for m, f in factors.items() if f is not None}
        if hooi_iters > 0 and len(truncated) > 1:
            factors.update(_tensorly.hooi_factors(t, truncated, hooi_iters))
        core = t
        for m, f in factors.items():
            if f is not None:
                core = np.moveaxis(np.tensordot(core, f, axes=([m], [0])), -1, m)
        sq_norm += float(np.sum(t**2))
        sq_kept += float(np.sum(core**2))
        ins.append(factors[1].T if factors[1] is not None else None)
        s = factors[2] if factors[2] is not None else np.eye(k)
        # depthwise channel b * R_s + c applies S[:, c] to input channel b
        taps.append(np.tile(s.T, (eff_in, 1)))  # (R_in * R_s, K)
        outs.append((core.reshape(eff_out, eff_in * eff_s), factors[0]))

    ones = (1,) * geometry.spatial_dims
    convs = []
    if r_in is not None:
        first = np.concatenate(ins, axis=0).reshape(g * r_in, i, *ones)
        convs.append(ConvSpec("in", first.astype(np.float32), g, False, False, True))
    depthwise = np.concatenate(taps, axis=0).reshape(g * eff_in * eff_s, 1, *kernel)
    convs.append(ConvSpec("spatial", depthwise.astype(np.float32), g * eff_in, True, False, False))
    mid = eff_in * eff_s
    if r_out is not None and r_out * (mid + o) < o * mid:
        core_w = np.concatenate([c for c, _ in outs], axis=0).reshape(g * r_out, mid, *ones)
        out_w = np.concatenate([u for _, u in outs], axis=0).reshape(g * o, r_out, *ones)
        convs.append(ConvSpec("core", core_w.astype(np.float32), g, False, False, False))
        convs.append(ConvSpec("out", out_w.astype(np.float32), g, False, True, False))
    else:
        folded = np.concatenate([u @ c if u is not None else c for c, u in outs], axis=0).reshape(g * o, mid, *ones)
        convs.append(ConvSpec("out", folded.astype(np.float32), g, False, True, False))
    return ChainSpec(
        method="tucker3",
        ranks={"out": r_out, "in": r_in, "spatial": r_s},
        convs=tuple(convs),
        rel_error=tucker2._projection_error(sq_norm, sq_kept),
    )


def chain_for_error(weight, geometry, target, *, spectra, cost, max_cost=None, step: int = 1) -> ChainSpec | None:
    """The cheapest spatial-Tucker chain with relative error ``<= target``, or None (exhaustive grid,
    see :mod:`onnxfactor.methods.search`)."""
    from onnxfactor.methods import search  # imports tucker2: not at the top

    return search.tucker_chain_for_error(
        decompose, weight, geometry, target, spectra=spectra, cost=cost, max_cost=max_cost, step=step, spatial=True
    )
