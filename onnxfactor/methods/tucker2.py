"""Tucker-2 decomposition of a Conv weight, and its SVD special case for pointwise convs.

A k x k Conv weight ``W`` (``C_out x C_in x k...``) is approximated on its two channel modes,

    W ~= G x_0 U x_1 V,   U: C_out x R_out,  V: C_in x R_in,  G = W x_0 U^T x_1 V^T,

(Kim et al., "Compression of deep convolutional neural networks for fast and low power mobile
applications", ICLR 2016). ``U`` and ``V`` are the leading left singular vectors of the mode-0
and mode-1 unfoldings (truncated HOSVD); optional HOOI sweeps refine them (tensorly). The layer
becomes three convs:

    1x1 (C_in -> R_in, weight V^T)  ->  k x k core (R_in -> R_out, weight G, original geometry)
    ->  1x1 (R_out -> C_out, weight U, original bias).

The first conv has no bias and is pointwise, so it commutes with the core's zero padding: the
chain is exact for any strides, pads (also asymmetric), dilations and auto_pad. A mode whose rank
is ``None`` is not decomposed and its pointwise conv is left out.

Grouped convs are decomposed group by group with one common rank and emitted as grouped chains
(block-diagonal factors), so the chain keeps the group structure.

Pointwise convs (all kernel dims 1) are a matrix ``W = B A`` (truncated SVD, ``A = S V^T``):
``A`` becomes the first conv, carrying strides/pads (zero input stays zero without a bias), ``B``
the second, with the bias.
"""

from __future__ import annotations

import numpy as np

from onnxfactor.config import RankConfig
from onnxfactor.methods.base import ChainSpec, ConvGeometry, ConvSpec
from onnxfactor.ranks import policies
from onnxfactor.spectral import WeightSpectra, mode_spectrum, unfold


def group_slices(weight: np.ndarray, group: int) -> list[np.ndarray]:
    """The per-group sub-weights ``(C_out/g, C_in/g, *k)`` of a grouped conv weight."""
    o = weight.shape[0] // group
    return [weight[g * o : (g + 1) * o] for g in range(group)]


def weight_spectra(
    weight: np.ndarray, geometry: ConvGeometry, *, in_mode: bool = True, spatial_mode: bool = False
) -> WeightSpectra:
    """Compute the spectra needed to choose ranks and build factors for ``weight``.

    ``spatial_mode`` adds the spectra of the spatial unfolding (``prod(kernel) x C_out C_in``),
    used by CP and spatial Tucker; Tucker-2 does not need it.
    """
    groups = group_slices(np.asarray(weight, dtype=np.float32), geometry.group)
    if geometry.is_pointwise:
        o, i = groups[0].shape[:2]
        transposed = o > i
        mats = [g.reshape(o, i) for g in groups]
        return WeightSpectra(
            matrix=tuple(mode_spectrum(m.T if transposed else m) for m in mats), transposed=transposed
        )
    return WeightSpectra(
        out=tuple(mode_spectrum(unfold(g, 0)) for g in groups),
        in_=tuple(mode_spectrum(unfold(g, 1)) for g in groups) if in_mode else None,
        spatial=tuple(mode_spectrum(unfold(as_three_way(g), 2)) for g in groups) if spatial_mode else None,
    )


def as_three_way(weight: np.ndarray) -> np.ndarray:
    """View a conv weight ``(O, I, *k)`` as the 3-way tensor ``(O, I, prod(k))`` (row-major taps)."""
    return weight.reshape(weight.shape[0], weight.shape[1], -1)


def choose_ranks(spectra: WeightSpectra, config: RankConfig, explicit: dict | None = None) -> policies.RankChoice:
    """Ranks ``{"out", "in"}`` (or ``{"rank"}`` for pointwise convs) by the configured policy.

    Same as :func:`onnxfactor.ranks.policies.choose_ranks`; here so that every method module
    exposes ``weight_spectra`` / ``choose_ranks`` / ``decompose``.
    """
    return policies.choose_ranks(spectra, config, explicit)


def decompose(
    weight: np.ndarray,
    geometry: ConvGeometry,
    ranks: dict,
    *,
    spectra: WeightSpectra | None = None,
    hooi_iters: int = 0,
) -> ChainSpec:
    """Build the Tucker-2 (or, for pointwise convs, SVD) chain for ``weight`` at ``ranks``.

    ``ranks`` is ``{"out": R_out | None, "in": R_in | None}`` for k x k convs and
    ``{"rank": R}`` for pointwise convs; ranks may equal the mode size (exact decomposition).
    """
    w = np.asarray(weight, dtype=np.float32)
    if spectra is None:
        spectra = weight_spectra(w, geometry, in_mode=ranks.get("in") is not None)
    if geometry.is_pointwise:
        return _svd_chain(w, geometry, int(ranks["rank"]), spectra)
    return _tucker2_chain(w, geometry, ranks.get("out"), ranks.get("in"), spectra, hooi_iters)


def _check_rank(name: str, rank: int, size: int) -> None:
    if not 1 <= rank <= size:
        raise ValueError(f"{name} rank {rank} is out of range: it must be in [1, {size}]")


def _tucker2_chain(w, geometry, r_out, r_in, spectra: WeightSpectra, hooi_iters: int) -> ChainSpec:
    g = geometry.group
    groups = group_slices(w, g)
    o, i = groups[0].shape[:2]
    kernel_ones = (1,) * geometry.spatial_dims
    if r_out is None and r_in is None:
        raise ValueError("Tucker-2 needs at least one decomposed mode (both ranks are None)")
    if r_out is not None:
        _check_rank("output-mode", r_out, o)
    if r_in is not None:
        _check_rank("input-mode", r_in, i)
        if spectra.in_ is None:
            raise ValueError("input-mode rank given but the input-mode spectra were not computed")

    u_list, v_list, cores = [], [], []
    sq_norm, sq_kept = 0.0, 0.0
    for gi, wg in enumerate(groups):
        u = spectra.out[gi].vectors[:, :r_out] if r_out is not None else None
        v = spectra.in_[gi].vectors[:, :r_in] if r_in is not None else None
        if hooi_iters > 0 and u is not None and v is not None:
            from onnxfactor import _tensorly

            u, v = _tensorly.hooi_channel_factors(wg, (r_out, r_in), hooi_iters)
        core = wg.astype(np.float64)
        if u is not None:
            core = np.einsum("oi...,or->ri...", core, u, optimize=True)
        if v is not None:
            core = np.einsum("ri...,is->rs...", core, v, optimize=True)
        u_list.append(u)
        v_list.append(v)
        cores.append(core)
        sq_norm += float(np.sum(np.square(wg, dtype=np.float64)))
        sq_kept += float(np.sum(np.square(core)))

    convs = []
    if r_in is not None:
        first = np.concatenate([v.T for v in v_list], axis=0).reshape(g * r_in, i, *kernel_ones)
        convs.append(ConvSpec("in", first.astype(np.float32), g, False, False, True))
    convs.append(
        ConvSpec("core", np.concatenate(cores, axis=0).astype(np.float32), g, True, r_out is None, False)
    )
    if r_out is not None:
        last = np.concatenate(u_list, axis=0).reshape(g * o, r_out, *kernel_ones)
        convs.append(ConvSpec("out", last.astype(np.float32), g, False, True, False))
    return ChainSpec(method="tucker2", ranks={"out": r_out, "in": r_in}, convs=tuple(convs), rel_error=_projection_error(sq_norm, sq_kept))


def _projection_error(sq_norm: float, sq_kept: float) -> float:
    """Relative error of an orthogonal projection: ``||W - P W||^2 = ||W||^2 - ||P W||^2``.

    Both Tucker-2 (``W x_0 U U^T x_1 V V^T`` with orthonormal ``U``, ``V``) and the truncated SVD
    are orthogonal projections of ``W``, so the error follows from the kept energy without
    rebuilding the dense weight.
    """
    if sq_norm <= 0:
        return 0.0
    return float(np.sqrt(max(sq_norm - sq_kept, 0.0) / sq_norm))


def _svd_chain(w, geometry, rank: int, spectra: WeightSpectra) -> ChainSpec:
    g = geometry.group
    groups = group_slices(w, g)
    o, i = groups[0].shape[:2]
    _check_rank("SVD", rank, min(o, i))
    kernel_ones = (1,) * geometry.spatial_dims
    firsts, seconds = [], []
    sq_norm, sq_kept = 0.0, 0.0
    for gi, wg in enumerate(groups):
        m = wg.reshape(o, i).astype(np.float64)
        basis = spectra.matrix[gi].vectors[:, :rank]
        if spectra.transposed:  # basis spans the input side: W ~= (W V) V^T
            firsts.append(basis.T)
            seconds.append(m @ basis)
            projected = seconds[-1]
        else:  # basis spans the output side: W ~= U (U^T W)
            firsts.append(basis.T @ m)
            seconds.append(basis)
            projected = firsts[-1]
        sq_norm += float(np.sum(np.square(m)))
        sq_kept += float(np.sum(np.square(projected)))
    first = np.concatenate(firsts, axis=0).reshape(g * rank, i, *kernel_ones)
    second = np.concatenate(seconds, axis=0).reshape(g * o, rank, *kernel_ones)
    return ChainSpec(
        method="svd",
        ranks={"rank": rank},
        convs=(
            ConvSpec("svd_a", first.astype(np.float32), g, True, False, False),
            ConvSpec("svd_b", second.astype(np.float32), g, False, True, False),
        ),
        rel_error=_projection_error(sq_norm, sq_kept),
    )


def chain_for_error(weight, geometry, target, *, spectra, cost, max_cost=None, step: int = 1) -> ChainSpec | None:
    """The cheapest Tucker-2 (SVD for pointwise) chain with relative error ``<= target``, or None.

    Exhaustive over the rank grid; see :mod:`onnxfactor.methods.search`.
    """
    from onnxfactor.methods import search  # imports this module: not at the top

    return search.tucker_chain_for_error(
        decompose, weight, geometry, target, spectra=spectra, cost=cost, max_cost=max_cost, step=step
    )
