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

Fitting. CP-ALS (tensorly ``parafac``, normalised factors, stopping when the relative error
changes by less than ``TOL``) on the full weight is slow: 4.7 s for 100 sweeps on the largest
nudenet 320n conv (256 x 128 x 3 x 3) at rank 84. We compress first (R. Bro, C. A. Andersson,
"Improving the speed of multi-way algorithms: Part II. Compression", Chemometrics and Intelligent
Laboratory Systems 42, 1998): project the 3-way weight onto the leading ``min(R, n)`` singular
vectors ``U_n`` of each unfolding (a truncated HOSVD, with the spectra already computed for the
rank choice), fit the CP of the small core ``G = W x_n U_n^T`` (``N_ITER_MAX`` sweeps), expand
its factors (``A = U_0 A_G``, ...) and, when the compression discarded energy, run
``REFINE_SWEEPS`` ALS sweeps on the full weight. When every multilinear rank is ``<= R`` the
compression is lossless. The core fit starts from tensorly's SVD initialisation, or from the
algebraic GEVD solution (:func:`gevd_init`) when that already fits to ``GEVD_ACCEPT``: exact
low-rank weights are then recovered exactly, where ALS from the SVD start can stall. CP-4 splits
each spatial column of the 3-way fit into per-axis factors and refines on the (2+d)-way weight
(:class:`CPFitter`). Measured on one core (``OPENBLAS_NUM_THREADS=1``, CPU time) for that conv at
its VBMF rank 84: CP-3 1.7 s (error 0.565), CP-4 3.1 s (error 0.567).

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

from onnxfactor import _tensorly
from onnxfactor.config import RankConfig
from onnxfactor.methods import tucker2
from onnxfactor.methods.base import ChainSpec, ConvGeometry, ConvSpec
from onnxfactor.methods.tucker2 import WeightSpectra, as_three_way, group_slices
from onnxfactor.ranks import policies
from onnxfactor.spectral import mode_spectrum, unfold

#: ALS sweeps on the compressed core (stopping earlier when the relative error changes by < TOL).
#: With 5 refinements, for the largest nudenet conv at rank 84 (CPU time, one core): 100 sweeps
#: 1.6 s, error 0.567; 150: 1.7 - 2.0 s, 0.565; 200: 2.3 s, 0.564; 300: 3.5 s, 0.563.
N_ITER_MAX = 150
TOL = 1e-8
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
#: nearly opposite directions and cancel: the signature of diverging ALS. On nudenet 320n at the
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

    g = geometry.group
    groups = group_slices(w, g)
    o, i = groups[0].shape[:2]
    nd = geometry.spatial_dims
    kernel = geometry.kernel_shape
    active = [j for j, k in enumerate(kernel) if k > 1]
    lams, factor_sets = [], []
    sq_err, sq_norm = 0.0, 0.0
    for gi, wg in enumerate(groups):
        fitter = CPFitter(wg, variant, known_bases=_known_bases(spectra, gi))
        lam, factors = fitter.fit(rank, n_iter_max)
        lams.append(lam)
        factor_sets.append(factors)
        sq_err += fitter.rel_error(lam, factors) ** 2 * fitter.norm**2
        sq_norm += fitter.norm**2
    rel_error = math.sqrt(sq_err / sq_norm) if sq_norm > 0 else 0.0

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
    sliced by every fit (the rank search of :func:`smallest_rank_for_error` fits many ranks).

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
            # the seed fixes the random columns tensorly adds to an SVD init beyond a mode's size
            lam, factors = _tensorly.parafac(core, rank, init=init, n_iter_max=n_iter_max, tol=TOL, random_state=RETRY_SEED)
            factors = [basis[:, :d] @ f for basis, d, f in zip(self.bases, dims, factors)]
            if lossy and REFINE_SWEEPS > 0:
                lam, factors = _tensorly.parafac(self.three, rank, init=(lam, factors), n_iter_max=REFINE_SWEEPS, tol=0)
            if self.split_shape:
                lam, factors = _split_spatial(lam, factors, self.split_shape)
                lam, factors = _tensorly.parafac(self.target, rank, init=(lam, factors), n_iter_max=REFINE_SWEEPS, tol=0)
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
    n_iter_max: int = N_ITER_MAX,
) -> int | None:
    """The smallest CP rank whose fit has ``||W - W_hat|| / ||W|| <= target_rel_error``, or None.

    Bisection over ``R`` in ``[1, R_max]``, ``R_max = max_n min(n, prod(other sizes))`` (the
    largest unfolding rank, per group; beyond it a CP chain rarely pays off), assuming the error
    falls with ``R`` (true of optimal fits, nearly so of ALS fits). Each group's singular bases
    and rotated core are computed once and sliced for every probe. ``None`` when even ``R_max``
    misses the target. A degenerate probe counts as missing the target. Pointwise convs use the
    exact SVD tail (no fitting).

    Cost: about ``log2(R_max)`` CP fits (8 for ``R_max = 256``), each up to ``N_ITER_MAX`` ALS
    sweeps on the compressed core plus ``REFINE_SWEEPS`` on the full weight; a fit costs roughly
    ``R x`` the size of its core per sweep, so the probes at large ``R`` (little compression left)
    dominate. Largest nudenet 320n conv (256 x 128 x 3 x 3), target 0.5: 8 fits (R = 128: 7.0 s,
    64: 1.1 s, ..., 109: 3.8 s), 30 s CPU on one core, rank 110; one fit at its VBMF rank 84
    takes 1.7 s.
    """
    if method not in VARIANTS:
        raise ValueError(f"unknown CP variant {method!r}; choose one of {', '.join(VARIANTS)}")
    if not 0.0 <= target_rel_error < 1.0:
        raise ValueError(f"target_rel_error must be in [0, 1), got {target_rel_error!r}")
    w = np.asarray(weight, dtype=np.float32)
    groups = group_slices(w, geometry.group)
    if geometry.is_pointwise:
        return _svd_rank_for_error(groups, target_rel_error)
    tensors = [CPFitter(wg, method) for wg in groups]
    sq_norm = sum(t.norm**2 for t in tensors)
    if sq_norm == 0.0:
        return 1

    def meets(rank: int) -> bool:
        sq_err = 0.0
        for t in tensors:
            try:
                lam, factors = t.fit(rank, n_iter_max)
            except DegenerateFit:
                return False
            sq_err += t.rel_error(lam, factors) ** 2 * t.norm**2
        return math.sqrt(sq_err / sq_norm) <= target_rel_error

    r_max = max(t.max_useful_rank for t in tensors)
    lo, hi = 0, r_max  # invariant: lo misses the target, hi meets it (hi = r_max unverified)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid
    if hi == r_max and not meets(r_max):
        return None
    return hi


def _svd_rank_for_error(groups: list[np.ndarray], target: float) -> int | None:
    """Eckart-Young: the error of rank ``r`` is the tail of the squared singular values."""
    tails, total = None, 0.0
    for wg in groups:
        m = wg.reshape(wg.shape[0], wg.shape[1]).astype(np.float64)
        s2 = np.linalg.svd(m, compute_uv=False) ** 2
        tail = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])  # tail[r] = sum_{k >= r} s_k^2
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

    def smallest_rank_for_error(self, weight, geometry, target_rel_error: float) -> int | None:
        return smallest_rank_for_error(weight, geometry, target_rel_error, self.name)


CP3 = CPMethod("cp3")
CP4 = CPMethod("cp4")
