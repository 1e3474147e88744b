"""CP decompositions of a Conv weight: CP-3 (Astrid & Lee 2017) and CP-4 (Lebedev et al. 2015).

CP-3 views a conv weight ``W`` (``C_out x C_in x k...``) as the 3-way tensor ``O x I x K``,
``K = prod(kernel)`` (taps flattened row-major), and approximates it by ``R`` rank-one terms,

    W[o, i, k] ~= sum_r lambda_r A[o, r] B[i, r] C[k, r],

(M. Astrid, S.-I. Lee, "CP-decomposition with tensor power method for convolutional neural
networks compression", BigComp 2017). The layer becomes

    1x1 (C_in -> R, weight B^T)  ->  depthwise k x k (R channels, weight C^T reshaped to the
    kernel, original geometry)  ->  1x1 (R -> C_out, weight A diag(lambda), original bias).

CP-4 (V. Lebedev, Y. Ganin, M. Rakhuba, I. Oseledets, V. Lempitsky, "Speeding-up convolutional
neural networks using fine-tuned CP-decomposition", ICLR 2015) keeps the spatial axes apart: a
``(2 + d)``-way CP ``W[o, i, t_0, .., t_{d-1}] ~= sum_r lambda_r A[o, r] B[i, r] prod_j C_j[t_j, r]``
whose middle conv is one depthwise conv per spatial axis ``j`` (kernel ``k_j`` on axis ``j``, 1
elsewhere), each carrying only its axis' stride, pads, dilation and auto_pad
(:class:`~onnxfactor.methods.base.ConvSpec` ``axis``, :func:`~onnxfactor.methods.base.geometry_attrs`).
Axes with kernel 1 are left out of the CP; such an axis still gets a per-axis conv (weight 1)
when it has a stride or padding. If only one per-axis conv remains (always in 1-D, where CP-4 is
CP-3) it carries the original geometry verbatim.

The first conv is pointwise without bias, so it commutes with the zero padding of the depthwise
convs: the chain computes exactly the CP approximation for any strides, pads, dilations and
auto_pad. Grouped convs are decomposed group by group with one common rank (block-diagonal
factors). Pointwise convs (a matrix: CP is the truncated SVD) get Tucker-2's SVD chain.

Fitting. CP-ALS (:func:`onnxfactor.methods.als.cp_als`, normalised factors, stopping when the
relative error changes by less than ``TOL``) on the full weight is slow: 4.7 s for 100 sweeps of
tensorly's ``parafac`` on the largest nudenet 320n conv (256 x 128 x 3 x 3) at rank 84. We compress first (R. Bro, C. A. Andersson,
"Improving the speed of multi-way algorithms: Part II. Compression", Chemometrics and Intelligent
Laboratory Systems 42, 1998): project the 3-way weight onto the leading ``min(R, n)`` singular
vectors ``U_n`` of each unfolding (a truncated HOSVD, with the spectra already computed for the
rank choice), fit the CP of the small core ``G = W x_n U_n^T`` (``N_ITER_MAX`` sweeps), expand
its factors (``A = U_0 A_G``, ...) and, when the compression discarded energy, run
``REFINE_SWEEPS`` ALS sweeps on the full weight. When every multilinear rank is ``<= R`` the
compression is lossless. The core fit starts from the SVD initialisation, or from the
algebraic GEVD solution (:func:`gevd_init`) when that already fits to ``GEVD_ACCEPT``: exact
low-rank weights are then recovered exactly, where ALS from the SVD start can stall. CP-4 splits
each spatial column of the 3-way fit into per-axis factors and refines on the (2+d)-way weight
(:class:`CPFitter`). Measured on one core (``OPENBLAS_NUM_THREADS=1``, CPU time) for that conv at
its VBMF rank 84: CP-3 1.2 s (error 0.564), CP-4 2.9 s (error 0.566).

Degeneracy. ALS can drift towards a "degenerate" solution (Kruskal, Harshman & Lundy 1989):
two or more components grow without bound while cancelling each other, which a float32 / fp16
chain reproduces badly and fine-tuning cannot fix. A fit is degenerate when (see
:func:`degeneracy_reason`) it is not finite, when a component's norm exceeds
``DIVERGENCE_RATIO = 10`` times ``||W||``, or when two components, each larger than ``||W||``,
nearly cancel: their signed congruence ``sign(lambda_r lambda_s) prod_n <a_n_r, a_n_s>`` (unit
columns) is below ``CANCELLATION_CONGRUENCE = -0.9``. A degenerate fit is repeated once from a
seeded random initialisation; if that is degenerate too, :class:`DegenerateFit` tells the caller
to use another method (the pipeline falls back to Tucker-2 and reports the reason).

``ChainSpec.rel_error`` is computed from the dense reconstruction: a CP fit is no orthogonal
projection, so the kept-energy shortcut of Tucker-2 does not apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnxfactor.config import RankConfig
from onnxfactor.methods import als, tucker2
from onnxfactor.methods.base import ChainSpec, ConvGeometry, ConvSpec
from onnxfactor.methods.tucker2 import as_three_way, group_slices
from onnxfactor.ranks import policies
from onnxfactor.spectral import WeightSpectra, mode_spectrum, tail_energy, unfold

#: ALS sweeps on the compressed core (stopping earlier when the relative error changes by < TOL).
#: With 5 refinements, for the largest nudenet conv at rank 84 (CPU time, one core): 100 sweeps
#: 1.6 s, error 0.567; 150: 1.7 - 2.0 s, 0.565; 200: 2.3 s, 0.564; 300: 3.5 s, 0.563.
N_ITER_MAX = 150
TOL = 1e-8
#: ALS sweeps per probe of the rank search (:func:`chain_for_error`), which fits many ranks.
#: Trained weights plateau early (largest nudenet conv, rank 84, CP-3: error 0.570 after 40
#: sweeps in 0.5 s CPU, 0.564 after 150 in 1.2 s), so the search probes with fewer sweeps; the
#: chain is the probe's fit, with its error as measured.
SEARCH_SWEEPS = 40
#: ALS sweeps on the full weight after a lossy compression (each costs about ``3 R |W|`` flops).
REFINE_SWEEPS = 5
#: The GEVD initialisation replaces the SVD one when its relative error is already below this:
#: the weight is (nearly) an exact rank-R CP, where ALS from the SVD init can stall far from the
#: solution (11.5 % error after 3000 sweeps on a random rank-5 12 x 8 x 9 tensor that GEVD
#: recovers exactly). On trained weights GEVD starts far off (error ~0.9) and ALS from it ends
#: with more nearly-cancelling components than from the SVD init, so the SVD init stays the default.
GEVD_ACCEPT = 1e-2
#: A component whose norm exceeds this many times ``||W||`` is diverging: the chain's
#: intermediate activations are that much larger than its output, so an fp16 chain loses about
#: a decimal digit to the cancellation.
DIVERGENCE_RATIO = 10.0
#: Two components, each larger than ``||W||``, whose signed congruence is below this point in
#: nearly opposite directions and cancel: the signature of diverging ALS. Measured with tensorly's
#: ALS (before :mod:`onnxfactor.methods.als`): on nudenet 320n at the
#: VBMF ranks (39 k x k convs) 3 CP-3 fits cross it from the SVD init (pairs at -0.92 .. -0.97),
#: 2 of them are fine from the random re-init, 1 (/model.15/m.0/cv2, rank 9) stays degenerate;
#: the other final fits stay above -0.9 (next lowest -0.89, -0.85). Smaller nearly-opposite pairs
#: (below -0.9 but under ``||W||``) are common and harmless. Random rank-R CP tensors stay above
#: -0.3; the classic border-rank tensor at rank 2 passes -0.9 after about 500 sweeps and tends to -1.
CANCELLATION_CONGRUENCE = -0.9
#: Seed of the random re-initialisation after a degenerate fit.
RETRY_SEED = 0

VARIANTS = ("cp3", "cp4")


class DegenerateFit(Exception):
    """The CP fit diverged (components growing and cancelling) with both initialisations.

    ``reason`` says which check failed; the pipeline catches this and falls back to Tucker-2.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def weight_spectra(weight: np.ndarray, geometry: ConvGeometry, *, in_mode: bool = True) -> WeightSpectra:
    """Spectra of the three unfoldings ``O x IK``, ``I x OK``, ``K x OI`` of each group.

    With ``in_mode=False`` (few input channels) only ``O x IK``, the 2-way rule of
    :func:`onnxfactor.ranks.policies.choose_cp_rank`. Pointwise convs: the matrix spectra.
    """
    return tucker2.weight_spectra(weight, geometry, in_mode=in_mode, spatial_mode=in_mode)


def choose_ranks(spectra: WeightSpectra, config: RankConfig, explicit: dict | None = None) -> policies.RankChoice:
    """``{"rank": R}`` by :func:`onnxfactor.ranks.policies.choose_cp_rank`."""
    return policies.choose_cp_rank(spectra, config, explicit)


def decompose(
    weight: np.ndarray,
    geometry: ConvGeometry,
    ranks: dict,
    *,
    spectra: WeightSpectra | None = None,
    hooi_iters: int = 0,
    variant: str = "cp3",
    n_iter_max: int = N_ITER_MAX,
) -> ChainSpec:
    """Build the CP-3 or CP-4 (``variant``) chain for ``weight`` at ``ranks = {"rank": R}``.

    ``hooi_iters`` is accepted for a uniform method interface and ignored (CP has no HOOI step).
    Raises :class:`DegenerateFit` when the fit diverges with both initialisations.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown CP variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    rank = ranks.get("rank")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"CP rank {rank!r} is out of range: it must be an integer >= 1")
    rank = int(rank)
    w = np.asarray(weight, dtype=np.float32)
    if geometry.is_pointwise:
        return tucker2.decompose(w, geometry, {"rank": rank}, spectra=spectra)

    groups = group_slices(w, geometry.group)
    fits = []
    for gi, wg in enumerate(groups):
        fitter = CPFitter(wg, variant, known_bases=_known_bases(spectra, gi))
        fits.append((fitter, *fitter.fit(rank, n_iter_max)))
    return _cp_chain(fits, geometry, variant, rank)


def _cp_chain(fits: list[tuple["CPFitter", np.ndarray, list[np.ndarray]]], geometry: ConvGeometry, variant: str, rank: int) -> ChainSpec:
    """The chain of per-group fits ``(fitter, lambda, factors)`` at one common ``rank``."""
    g = geometry.group
    o, i = fits[0][0].three.shape[:2]
    nd = geometry.spatial_dims
    kernel = geometry.kernel_shape
    active = [j for j, k in enumerate(kernel) if k > 1]
    sq_err = sum(f.rel_error(lam, factors) ** 2 * f.norm**2 for f, lam, factors in fits)
    sq_norm = sum(f.norm**2 for f, _, _ in fits)
    rel_error = math.sqrt(sq_err / sq_norm) if sq_norm > 0 else 0.0
    factor_sets = [factors for _, _, factors in fits]
    lams = [lam for _, lam, _ in fits]

    ones = (1,) * nd
    first = np.concatenate([f[1].T for f in factor_sets], axis=0).reshape(g * rank, i, *ones)
    last = np.concatenate([f[0] * lam for f, lam in zip(factor_sets, lams)], axis=0).reshape(g * o, rank, *ones)
    convs = [ConvSpec("in", first.astype(np.float32), g, False, False, True)]
    if variant == "cp3":
        taps = np.concatenate([f[2].T for f in factor_sets], axis=0)  # (g*R, K)
        convs.append(ConvSpec("depthwise", taps.reshape(g * rank, 1, *kernel).astype(np.float32), g * rank, True, False, False))
    else:
        axes = [j for j in range(nd) if j in active or not _axis_geometry_is_trivial(geometry, j)]
        for j in axes:
            if j in active:
                taps = np.concatenate([f[2 + active.index(j)].T for f in factor_sets], axis=0)
            else:  # kernel 1 but a stride or padding to apply
                taps = np.ones((g * rank, 1))
            shape = tuple(kernel[a] if a == j else 1 for a in range(nd))
            weight_j = taps.reshape(g * rank, 1, *shape).astype(np.float32)
            if len(axes) == 1:  # the other axes have kernel 1, stride 1 and no padding
                convs.append(ConvSpec("depthwise", weight_j, g * rank, True, False, False))
            else:
                convs.append(ConvSpec(f"axis{j}", weight_j, g * rank, False, False, False, axis=j))
    convs.append(ConvSpec("out", last.astype(np.float32), g, False, True, False))
    return ChainSpec(method=variant, ranks={"rank": rank}, convs=tuple(convs), rel_error=rel_error)


def _known_bases(spectra: WeightSpectra | None, gi: int) -> dict[int, np.ndarray]:
    """The singular bases of the 3-way unfoldings computed for rank choice: ``mode -> L x L``."""
    if spectra is None:
        return {}
    modes = {0: spectra.out, 1: spectra.in_, 2: spectra.spatial}
    return {m: spec[gi].vectors for m, spec in modes.items() if spec is not None}


def _axis_geometry_is_trivial(geometry: ConvGeometry, j: int) -> bool:
    """A kernel-1 axis with stride 1 and no padding needs no conv of its own."""
    nd = geometry.spatial_dims
    if geometry.strides[j] != 1:
        return False
    if geometry.auto_pad in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        return True  # kernel 1, stride 1: no padding under any auto_pad
    return geometry.pads[j] == 0 and geometry.pads[nd + j] == 0


# ------------------------------------------------------------------------------------------------
# Fitting


class CPFitter:
    """Fits the CP of one group's weight at any rank, reusing its compression.

    The 3-way tensor ``O x I x K`` is rotated once onto the full singular bases of its three
    unfoldings (``known_bases`` from the rank-choice spectra, the rest computed). The bases are
    nested (leading singular vectors first), so the compressed core at rank ``R`` is the leading
    ``min(R, n_0) x min(R, n_1) x min(R, n_2)`` block of the rotated tensor: computed once,
    sliced by every fit (the rank search of :func:`chain_for_error` fits many ranks).

    For ``cp4`` with two or more spatial axes of kernel > 1 the fit continues on the
    ``O x I x k_0 x ..`` tensor (axes of kernel 1 dropped): each spatial column of the 3-way fit is
    split into its best rank-one (HOSVD) per-axis factors, then ``REFINE_SWEEPS`` ALS sweeps run on
    the full (2+d)-way weight. ALS directly on the (2+d)-way core is much slower with tensorly
    (its Khatri-Rao products grow with the order): 12 s, error 0.565, against 3.1 s, error 0.567,
    for the largest nudenet conv at rank 84.
    """

    def __init__(self, weight_group: np.ndarray, variant: str = "cp3", *, known_bases: dict[int, np.ndarray] | None = None):
        w = np.asarray(weight_group, dtype=np.float64)
        known_bases = known_bases or {}
        self.three = as_three_way(w)
        self.norm = float(np.linalg.norm(self.three))
        active = tuple(k for k in w.shape[2:] if k > 1)
        self.split_shape = active if variant == "cp4" and len(active) > 1 else None
        #: the tensor whose CP the chain implements
        self.target = w.reshape(*w.shape[:2], *active) if self.split_shape else self.three
        self.bases, self.mode_ranks = [], []
        rotated = self.three
        for n, size in enumerate(self.three.shape):
            basis = known_bases.get(n)
            if basis is None:
                basis = mode_spectrum(unfold(self.three, n)).vectors
            # the mode-n unfolding has rank <= min(n, prod(other sizes))
            self.mode_ranks.append(min(size, self.three.size // size))
            self.bases.append(basis[:, : self.mode_ranks[-1]])
            rotated = np.moveaxis(np.tensordot(rotated, self.bases[-1], axes=([n], [0])), -1, n)
        self.rotated = rotated
        #: squared singular values of each 3-way unfolding: the rotated tensor's slice energies
        self.sq_singular_values = [
            np.sum(rotated**2, axis=tuple(m for m in range(3) if m != n)) for n in range(3)
        ]

    @property
    def max_useful_rank(self) -> int:
        """``max_n min(n, prod(other sizes))``: the largest matrix rank of any unfolding."""
        return max(self.mode_ranks)

    def fit(self, rank: int, n_iter_max: int = N_ITER_MAX) -> tuple[np.ndarray, list[np.ndarray]]:
        """``(lambda, unit-column factors)`` of the target tensor; raises :class:`DegenerateFit`."""
        if self.norm == 0.0:  # any unit factors with zero weights
            return np.zeros(rank), [np.eye(n, rank) for n in self.target.shape]
        dims = [min(rank, r) for r in self.mode_ranks]
        core = self.rotated[tuple(slice(0, d) for d in dims)]
        lossy = float(np.sum(core**2)) < self.norm**2 * (1.0 - 1e-12)
        inits = {}
        gevd = gevd_init(core, rank)
        # (a border-rank tensor has near-exact GEVD fits made of huge cancelling components)
        if (
            gevd is not None
            and _rel_error(core, *gevd) <= GEVD_ACCEPT
            and degeneracy_reason(*normalise(*gevd), self.norm) is None
        ):
            inits["GEVD init"] = gevd
        else:
            inits["SVD init"] = "svd"
        rng = np.random.default_rng(RETRY_SEED)
        inits["random init"] = (np.ones(rank), [rng.standard_normal((d, rank)) for d in dims])
        reasons = []
        for label, init in inits.items():
            # the seed fixes the random columns the SVD init adds beyond a mode's size
            lam, factors, _ = als.cp_als(core, rank, init, n_iter_max=n_iter_max, tol=TOL, seed=RETRY_SEED)
            factors = [basis[:, :d] @ f for basis, d, f in zip(self.bases, dims, factors)]
            if lossy and REFINE_SWEEPS > 0:
                lam, factors, _ = als.cp_als(self.three, rank, (lam, factors), n_iter_max=REFINE_SWEEPS, tol=0)
            if self.split_shape:
                lam, factors = _split_spatial(lam, factors, self.split_shape)
                lam, factors, _ = als.cp_als(self.target, rank, (lam, factors), n_iter_max=REFINE_SWEEPS, tol=0)
            lam, factors = normalise(lam, factors)
            reason = degeneracy_reason(lam, factors, self.norm)
            if reason is None:
                return lam, factors
            reasons.append(f"{label}: {reason}")
        raise DegenerateFit(f"CP fit at rank {rank} is degenerate ({'; '.join(reasons)})")

    def rel_error(self, lam: np.ndarray, factors: list[np.ndarray]) -> float:
        """``||T - T_hat|| / ||T||`` of the target tensor."""
        return _rel_error(self.target, lam, factors)


def _split_spatial(lam: np.ndarray, factors: list[np.ndarray], shape: tuple[int, ...]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Replace the ``K x R`` spatial factor by per-axis factors: each column, reshaped to the
    kernel, by its leading singular vector per axis (truncated HOSVD to rank one), the
    column's projection onto their outer product going into ``lambda``."""
    spatial = factors[2]
    per_axis = [np.empty((k, spatial.shape[1])) for k in shape]
    scale = np.empty(spatial.shape[1])
    for r in range(spatial.shape[1]):
        col = spatial[:, r].reshape(shape)
        vectors = [mode_spectrum(unfold(col, m)).vectors[:, 0] for m in range(len(shape))]
        proj = col
        for v in vectors:
            proj = np.tensordot(v, proj, axes=([0], [0]))
        scale[r] = float(proj)
        for m, v in enumerate(vectors):
            per_axis[m][:, r] = v
    return lam * scale, [factors[0], factors[1], *per_axis]


def _rel_error(tensor: np.ndarray, lam: np.ndarray, factors: list[np.ndarray]) -> float:
    norm = float(np.linalg.norm(tensor))
    return float(np.linalg.norm(tensor - cp_to_dense(lam, factors)) / norm) if norm > 0 else 0.0


def gevd_init(core: np.ndarray, rank: int) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """Algebraic CP initialisation by a generalised eigendecomposition (GEVD), or None.

    For ``T = sum_r a_r o b_r o c_r`` with ``R <= n_0, n_1`` and two mixtures of the mode-0/1
    slices ``S_1 = T x_2 w_1 = A' D_1 B'^T``, ``S_2 = T x_2 w_2 = A' D_2 B'^T`` (``w_1``, ``w_2`` the
    leading singular vectors of the trailing modes' unfolding), the eigenvectors of
    ``S_1 S_2^{-1}`` are the columns of ``A'``; then ``B'^T = A'^{-1} S_2`` and the trailing factors
    by least squares (Sanchez & Kowalski, "Tensorial resolution: a direct trilinear
    decomposition", J. Chemometrics 4, 1990; the default CP initialisation of Tensorlab). Exact
    for an exact rank-``R`` tensor; a complex-conjugate eigenpair is replaced by its real and
    imaginary parts. None when ``R`` exceeds ``n_0`` or ``n_1``, ``n_2 < 2``, or the pencil is
    singular.
    """
    n0, n1, n2 = core.shape
    if rank > min(n0, n1) or n2 < 2:
        return None
    t = core
    basis0 = mode_spectrum(unfold(t, 0)).vectors[:, :rank]
    basis1 = mode_spectrum(unfold(t, 1)).vectors[:, :rank]
    mix = mode_spectrum(unfold(t, 2)).vectors[:, :2]
    small = np.einsum("ijk,ia,jb->abk", t, basis0, basis1, optimize=True)
    s1, s2 = small @ mix[:, 0], small @ mix[:, 1]
    if np.linalg.cond(s2) > 1e12:
        return None
    eigvals, eigvecs = np.linalg.eig(np.linalg.solve(s2.T, s1.T).T)  # S_1 S_2^{-1}
    a = np.empty((rank, rank))
    k = 0
    while k < rank:
        if abs(eigvals[k].imag) > 1e-12 * max(abs(eigvals[k]), 1.0) and k + 1 < rank:
            a[:, k], a[:, k + 1] = eigvecs[:, k].real, eigvecs[:, k].imag
            k += 2
        else:
            a[:, k] = eigvecs[:, k].real
            k += 1
    if np.linalg.cond(a) > 1e12:
        return None
    b = np.linalg.solve(a, s2).T
    gram = (a.T @ a) * (b.T @ b)
    c = np.einsum("ijk,ir,jr->kr", small, a, b, optimize=True) @ np.linalg.pinv(gram)
    factors = [basis0 @ a, basis1 @ b, c]
    if not all(np.isfinite(f).all() for f in factors):
        return None
    return np.ones(rank), factors


def normalise(lam: np.ndarray, factors: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Move the column norms of every factor into ``lambda`` (zero columns stay zero)."""
    lam = np.asarray(lam, dtype=np.float64).copy()
    unit = []
    for f in factors:
        norms = np.linalg.norm(f, axis=0)
        lam *= norms
        unit.append(f / np.where(norms > 0, norms, 1.0))
    return lam, unit


def degeneracy_reason(lam: np.ndarray, factors: list[np.ndarray], norm: float) -> str | None:
    """Why the CP fit ``(lam, unit factors)`` of a tensor of norm ``norm`` is degenerate, or None.

    Checks, in order: non-finite values; a component norm ``|lambda_r| > DIVERGENCE_RATIO ||W||``;
    a pair of components, each of norm ``> ||W||``, whose signed congruence
    ``sign(lambda_r lambda_s) prod_n <a_n_r, a_n_s>`` (the cosine between the two rank-one terms)
    is below ``CANCELLATION_CONGRUENCE``: they point in nearly opposite directions and cancel,
    the hallmark of diverging ALS. (Small nearly-opposite components are common in fits of noisy
    weights and harmless.)
    """
    if not (np.isfinite(lam).all() and all(np.isfinite(f).all() for f in factors)):
        return "non-finite factors"
    big = int(np.argmax(np.abs(lam)))
    if abs(lam[big]) > DIVERGENCE_RATIO * norm:
        return f"component {big} has norm {abs(lam[big]) / norm:.3g} x ||W|| (limit {DIVERGENCE_RATIO:g})"
    if lam.size > 1:
        congruence = np.sign(np.outer(lam, lam))
        for f in factors:
            congruence = congruence * (f.T @ f)
        np.fill_diagonal(congruence, np.inf)
        large = np.abs(lam) > norm
        congruence[~(large[:, None] & large[None, :])] = np.inf
        r, s = np.unravel_index(int(np.argmin(congruence)), congruence.shape)
        if congruence[r, s] < CANCELLATION_CONGRUENCE:
            return (f"components {min(r, s)} and {max(r, s)} nearly cancel: congruence {congruence[r, s]:.3f} "
                    f"(limit {CANCELLATION_CONGRUENCE:g}), norms {abs(lam[r]) / norm:.3g} and {abs(lam[s]) / norm:.3g} x ||W||")
    return None


def cp_to_dense(lam: np.ndarray, factors: list[np.ndarray]) -> np.ndarray:
    """``sum_r lambda_r a_0r o a_1r o ...`` as a dense array (row-major, last mode fastest)."""
    rank = lam.shape[0]
    khatri_rao = factors[-1]
    for f in reversed(factors[1:-1]):
        khatri_rao = (f[:, None, :] * khatri_rao[None, :, :]).reshape(-1, rank)
    return ((factors[0] * lam) @ khatri_rao.T).reshape([f.shape[0] for f in factors])


# ------------------------------------------------------------------------------------------------
# Rank for a target error


def smallest_rank_for_error(
    weight: np.ndarray,
    geometry: ConvGeometry,
    target_rel_error: float,
    method: str = "cp3",
    *,
    n_iter_max: int = SEARCH_SWEEPS,
) -> int | None:
    """The smallest CP rank whose fit has ``||W - W_hat|| / ||W|| <= target_rel_error``, or None.

    The rank of :func:`chain_for_error`'s chain (see there for the search and its cost).
    """
    chain = chain_for_error(weight, geometry, target_rel_error, method, n_iter_max=n_iter_max)
    return None if chain is None else int(chain.ranks["rank"])


def chain_for_error(
    weight: np.ndarray,
    geometry: ConvGeometry,
    target_rel_error: float,
    method: str = "cp3",
    *,
    max_rank: int | None = None,
    spectra: WeightSpectra | None = None,
    step: int = 1,
    n_iter_max: int = SEARCH_SWEEPS,
) -> ChainSpec | None:
    """The CP chain of smallest rank ``R <= max_rank`` with relative error ``<= target_rel_error``, or None.

    Only multiples of ``step`` are tried (``--round-to``).

    Galloping search (``R_lo, 2 R_lo, 4 R_lo, ..``) then bisection over ``R`` in ``[R_lo, R_hi]``,
    assuming the error falls with ``R`` (true of optimal fits, nearly so of ALS fits); the largest
    rank fitted is at most twice the answer, and fits at small ranks are cheap. ``R_hi = min(max_rank, R_max)``, ``R_max = max_n min(n, prod(other
    sizes))`` (the largest unfolding rank, per group; beyond it a CP chain rarely pays off).
    ``R_lo`` is free: every unfolding of a rank-``R`` CP tensor has matrix rank ``<= R``, so by
    Eckart-Young no CP of rank ``R`` beats the truncated SVD of any unfolding; the ranks whose
    SVD tails already exceed the target are skipped without fitting (and when ``R_hi`` is among
    them, no fit runs at all: that is what makes ``--method auto`` cheap on layers where CP
    cannot win). Each group's singular bases and rotated core are computed once and sliced for
    every probe; the chain is the last probe that met the target (no re-fit). A degenerate probe
    counts as missing the target. Pointwise convs use the exact SVD tail (no fitting).

    Cost: about ``2 log2(R / R_lo)`` CP fits, each up to ``n_iter_max`` ALS sweeps on the
    compressed core plus ``REFINE_SWEEPS`` on the full weight; a fit costs roughly ``R x`` the
    size of its core per sweep, so the probes at the largest ranks dominate. For scale: on the
    largest nudenet 320n conv (256 x 128 x 3 x 3) one fit at rank 128 takes 7.0 s, at its VBMF
    rank 84 1.7 s, at 64 1.1 s (CPU, one core).
    """
    if method not in VARIANTS:
        raise ValueError(f"unknown CP variant {method!r}; choose one of {', '.join(VARIANTS)}")
    if not 0.0 <= target_rel_error < 1.0:
        raise ValueError(f"target_rel_error must be in [0, 1), got {target_rel_error!r}")
    w = np.asarray(weight, dtype=np.float32)
    groups = group_slices(w, geometry.group)
    if geometry.is_pointwise:
        rank = _svd_rank_for_error(groups, target_rel_error)
        if rank is None or (max_rank is not None and rank > max_rank):
            return None
        return tucker2.decompose(w, geometry, {"rank": rank}, spectra=spectra)
    fitters = [CPFitter(wg, method, known_bases=_known_bases(spectra, gi)) for gi, wg in enumerate(groups)]
    sq_norm = sum(f.norm**2 for f in fitters)
    r_hi = max(f.max_useful_rank for f in fitters)
    if max_rank is not None:
        r_hi = min(r_hi, max_rank)
    r_lo = 1 if sq_norm == 0.0 else _eckart_young_rank(fitters, target_rel_error)
    # search over units of ``step``: rank = unit * step
    r_lo, r_hi = -(-r_lo // step), r_hi // step
    if r_lo > r_hi or r_hi < 1:
        return None
    found: dict[int, ChainSpec] = {}

    def meets(unit: int) -> bool:
        rank = unit * step
        try:
            fits = [(f, *f.fit(rank, n_iter_max)) for f in fitters]
        except DegenerateFit:
            return False
        chain = _cp_chain(fits, geometry, method, rank)
        if chain.rel_error <= target_rel_error:
            found[unit] = chain
            return True
        return False

    # Galloping from R_lo (fits at small ranks are cheap), then bisection between the last miss
    # and the first hit: the largest rank fitted is at most twice the answer.
    lo, hi = r_lo - 1, None  # lo misses the target (or is 0); hi meets it
    probe = r_lo
    while hi is None:
        if meets(probe):
            hi = probe
        elif probe >= r_hi:
            return None
        else:
            lo, probe = probe, min(2 * probe, r_hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return found[hi]


def _eckart_young_rank(fitters: list["CPFitter"], target: float) -> int:
    """The smallest ``R`` at which every unfolding's truncated SVD (summed over groups) meets ``target``.

    A lower bound on the CP rank meeting it: a rank-``R`` CP has unfoldings of matrix rank ``<= R``.
    """
    sq_norm = sum(f.norm**2 for f in fitters)
    bound = 1
    for n in range(3):
        size = max(f.sq_singular_values[n].size for f in fitters)
        sq = np.zeros(size)
        for f in fitters:
            sq[: f.sq_singular_values[n].size] += f.sq_singular_values[n]
        tail = tail_energy(sq)
        ok = np.nonzero(np.sqrt(np.clip(tail, 0.0, None) / sq_norm) <= target)[0]
        bound = max(bound, int(ok[0]) if ok.size else size)
    return bound


def _svd_rank_for_error(groups: list[np.ndarray], target: float) -> int | None:
    """Eckart-Young: the error of rank ``r`` is the tail of the squared singular values."""
    tails, total = None, 0.0
    for wg in groups:
        m = wg.reshape(wg.shape[0], wg.shape[1]).astype(np.float64)
        s2 = np.linalg.svd(m, compute_uv=False) ** 2
        tail = tail_energy(s2)
        tails = tail if tails is None else tails + tail
        total += float(s2.sum())
    if total == 0.0:
        return 1
    ok = np.nonzero(np.sqrt(tails / total) <= target)[0]
    return max(int(ok[0]), 1)


# ------------------------------------------------------------------------------------------------
# Registry entries


@dataclass(frozen=True)
class CPMethod:
    """``cp3`` or ``cp4`` as a registry entry: this module's functions with ``variant`` bound."""

    name: str

    def weight_spectra(self, weight: np.ndarray, geometry: ConvGeometry, *, in_mode: bool = True) -> WeightSpectra:
        return weight_spectra(weight, geometry, in_mode=in_mode)

    def choose_ranks(self, spectra: WeightSpectra, config: RankConfig, explicit: dict | None = None) -> policies.RankChoice:
        return choose_ranks(spectra, config, explicit)

    def decompose(self, weight, geometry, ranks, *, spectra=None, hooi_iters: int = 0) -> ChainSpec:
        return decompose(weight, geometry, ranks, spectra=spectra, hooi_iters=hooi_iters, variant=self.name)

    def chain_for_error(self, weight, geometry, target, *, spectra, cost, max_cost=None, step: int = 1) -> ChainSpec | None:
        """The cheapest (= lowest-rank) chain meeting ``target`` whose cost is below ``max_cost``."""
        limit = cost.original() if max_cost is None else min(max_cost, cost.original())
        max_rank = math.ceil(limit / cost.cp_per_rank(self.name)) - 1  # cost(R) < limit
        if max_rank < 1:
            return None
        return chain_for_error(weight, geometry, target, self.name, max_rank=max_rank, spectra=spectra, step=step)


CP3 = CPMethod("cp3")
CP4 = CPMethod("cp4")
