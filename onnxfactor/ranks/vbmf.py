"""Empirical variational Bayesian matrix factorization (EVBMF): the rank of a noisy matrix.

Model (Nakajima et al., 2013): an ``L x M`` matrix ``V = B A^T + E`` with ``L <= M`` (transpose
otherwise), i.i.d. noise ``E_lm ~ N(0, sigma^2)``, Gaussian priors on the columns of ``A`` and
``B`` whose variances are learned from the data (empirical Bayes). Write ``alpha = L / M`` and
``gamma_1 >= ... >= gamma_L`` for the singular values of ``V``.

Threshold. The global EVB solution is a truncated, shrunk SVD of ``V``: component ``h`` is kept
if and only if

    gamma_h > gamma_EVB = sigma * sqrt(M * x_bar),    x_bar = (1 + tau_bar) (1 + alpha / tau_bar),

equivalently ``gamma_EVB = sigma * sqrt(L + M + sqrt(L M) (kappa + 1 / kappa))`` with
``kappa = tau_bar / sqrt(alpha)``, where ``tau_bar`` is the unique positive zero of

    Psi(tau) = log(1 + tau) + alpha * log(1 + tau / alpha) - tau.

``Psi`` is the free energy of the positive local solution minus that of the null solution, so a
component survives exactly when keeping it lowers the free energy. We solve ``Psi(tau) = 0`` by
bisection. The constant ``tau_bar ~= 2.5129 sqrt(alpha)`` used by common reimplementations is
exact only for ``alpha = 1``; for ``alpha < 1`` it slightly underestimates ``tau_bar`` (the
threshold is 0.5 % low at ``alpha = 1/9``, 1 % at ``alpha = 1/100``).

Noise variance. When ``sigma^2`` is unknown it minimises the free energy left after every other
parameter is at its optimum. Up to constants, ``2 F / M`` is

    Omega(sigma^2) = L log sigma^2 + sum_h [ x_h + [x_h > x_bar] psi_1(x_h) ],
    x_h = gamma_h^2 / (M sigma^2),
    psi_1(x) = log(1 + tau(x)) + alpha log(1 + tau(x) / alpha) - tau(x),
    tau(x) = ( x - 1 - alpha + sqrt((x - 1 - alpha)^2 - 4 alpha) ) / 2,

(``tau(x)`` inverts ``x = (1 + tau)(1 + alpha / tau)``; ``psi_1(x_bar) = 0``, so ``Omega`` is
continuous). The minimiser lies in (Nakajima et al., 2012, 2015)

    sigma^2_upper = sum_h gamma_h^2 / (L M),
    sigma^2_lower = max( gamma_{H+1}^2 / (M x_bar),  sum_{h > H} gamma_h^2 / (M (L - H)) ),
    H = ceil(L / (1 + alpha)) - 1   (the largest rank EVB can return).

``Omega`` need not be unimodal, so we evaluate it on a dense grid in ``log sigma^2`` and refine the
best grid cell by golden-section search (numpy only). All work is done on ``gamma^2`` divided by
``M sigma^2_upper``, so scaling the matrix by ``c`` leaves the rank unchanged and scales
``sigma^2`` by ``c^2``.

Rank 0 is a normal result: the matrix is indistinguishable from noise.

References
----------
S. Nakajima, M. Sugiyama, S. D. Babacan, R. Tomioka, "Global analytic solution of fully-observed
variational Bayesian matrix factorization", JMLR 14:1-37, 2013.

S. Nakajima, R. Tomioka, M. Sugiyama, S. D. Babacan, "Perfect dimensionality recovery by
variational Bayesian PCA", NIPS 2012; extended as "Condition for perfect dimensionality recovery
by variational Bayesian PCA", JMLR 16, 2015 (noise-variance bounds, ``psi`` form).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# sigma^2_lower is floored at this fraction of sigma^2_upper: an exactly low-rank matrix has
# sigma^2_lower = 0, where Omega tends to -inf; the floor keeps the search finite and puts the
# threshold far below any singular value that is not rounding noise of the Gram eigenvalues.
_MIN_SIGMA2_RATIO = 1e-12
# Grid spacing in log(sigma^2) and its bounds on the number of points.
_GRID_STEP = 0.02
_GRID_MIN, _GRID_MAX = 32, 2048
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class VBMFResult:
    """The EVBMF rank of one matrix, with the noise variance and threshold behind it."""

    rank: int                    # estimated rank (0 allowed)
    sigma2: float                # estimated (or given) noise variance of entries
    threshold: float             # singular-value truncation threshold: components with s > threshold are kept
    singular_values: np.ndarray  # all min(L, M) singular values, descending, float64
    shape: tuple[int, int]       # (L, M) after transposition, L <= M

    def __post_init__(self):
        L, M = self.shape
        if not 0 < L <= M:
            raise ValueError(f"VBMFResult.shape must be (L, M) with 0 < L <= M, got {self.shape}")
        if self.singular_values.shape != (L,):
            raise ValueError(
                f"VBMFResult.singular_values.shape={self.singular_values.shape} but shape={self.shape} needs ({L},)"
            )
        if not 0 <= self.rank <= L:
            raise ValueError(f"VBMFResult.rank={self.rank} must lie in [0, {L}]")


@lru_cache(maxsize=256)
def _tau_bar(L: int, M: int) -> float:
    """The positive zero of ``Psi(tau) = log(1 + tau) + alpha log(1 + tau / alpha) - tau``."""
    alpha = L / M

    def psi(tau: float) -> float:
        return math.log1p(tau) + alpha * math.log1p(tau / alpha) - tau

    # Psi(0) = 0, Psi'(0) = 1 and Psi is concave, so it is positive on (0, tau_bar) and negative
    # beyond; the positive solution exists only for tau > sqrt(alpha), where Psi is still > 0.
    lo = math.sqrt(alpha)
    hi = 3.0 * lo
    while psi(hi) > 0.0:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if psi(mid) > 0.0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _x_bar(L: int, M: int) -> float:
    """``x_bar = (1 + tau_bar)(1 + alpha / tau_bar)``: the threshold on ``gamma^2 / (M sigma^2)``."""
    tau = _tau_bar(L, M)
    return (1.0 + tau) * (1.0 + (L / M) / tau)


def _psi1(x: np.ndarray, alpha: float) -> np.ndarray:
    """``psi_1(x)`` for ``x > x_bar`` (where it is negative)."""
    d = x - (1.0 + alpha)
    tau = 0.5 * (d + np.sqrt(d * d - 4.0 * alpha))
    return np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau


def _objective(t: np.ndarray, q: np.ndarray, L: int, alpha: float, x_bar: float) -> np.ndarray:
    """``Omega`` at ``sigma^2 = sigma^2_upper * exp(t)`` (minus a constant), ``q = gamma^2 / (M sigma^2_upper)``."""
    t = np.atleast_1d(t)
    x = q[None, :] * np.exp(-t)[:, None]
    value = x.sum(axis=1) + L * t
    kept = x > x_bar
    if kept.any():
        psi = np.zeros_like(x)
        psi[kept] = _psi1(x[kept], alpha)
        value += psi.sum(axis=1)
    return value


def _minimise_log_sigma2(q: np.ndarray, L: int, alpha: float, x_bar: float, t_lo: float) -> float:
    """Minimise ``Omega`` over ``t = log(sigma^2 / sigma^2_upper)`` in ``[t_lo, 0]``: grid, then golden section."""
    n = int(min(max(math.ceil(-t_lo / _GRID_STEP) + 1, _GRID_MIN), _GRID_MAX))
    grid = np.linspace(t_lo, 0.0, n)
    values = _objective(grid, q, L, alpha, x_bar)
    best = int(np.argmin(values))
    best_t, best_value = float(grid[best]), float(values[best])

    a, b = float(grid[max(best - 1, 0)]), float(grid[min(best + 1, n - 1)])
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = (float(v) for v in _objective(np.array([c, d]), q, L, alpha, x_bar))
    while b - a > 1e-10:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = float(_objective(c, q, L, alpha, x_bar)[0])
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = float(_objective(d, q, L, alpha, x_bar)[0])
    t, value = (c, fc) if fc <= fd else (d, fd)
    return t if value <= best_value else best_t


def evbmf_from_singular_values(singular_values, shape, sigma2=None) -> VBMFResult:
    """EVBMF rank, noise variance and threshold of a matrix, from its singular values alone.

    With ``L <= M`` the matrix sides (transposed if needed), ``alpha = L / M`` and
    ``x_bar = (1 + tau_bar)(1 + alpha / tau_bar)`` (``tau_bar`` the positive zero of
    ``log(1 + tau) + alpha log(1 + tau / alpha) - tau``), component ``h`` is kept iff

        gamma_h > threshold = sqrt(M * sigma^2 * x_bar).

    If ``sigma2`` is None, ``sigma^2`` minimises the EVB free energy

        Omega(sigma^2) = L log sigma^2 + sum_h [x_h + [x_h > x_bar] psi_1(x_h)],  x_h = gamma_h^2 / (M sigma^2),

    over ``[sigma^2_lower, sigma^2_upper]`` with ``sigma^2_upper = sum gamma_h^2 / (L M)`` and
    ``sigma^2_lower = max(gamma_{H+1}^2 / (M x_bar), sum_{h>H} gamma_h^2 / (M (L - H)))``,
    ``H = ceil(L / (1 + alpha)) - 1``. See the module docstring for ``psi_1``.

    Parameters
    ----------
    singular_values : array_like
        All ``min(L, M)`` singular values of the matrix, in any order.
    shape : tuple of int
        The matrix shape, either orientation.
    sigma2 : float, optional
        Known noise variance of the entries; ``None`` (default) estimates it.

    Returns
    -------
    VBMFResult
        ``rank`` is 0 when the matrix is indistinguishable from noise; an all-zero matrix gives
        ``rank = 0``, ``sigma2 = 0.0``, ``threshold = 0.0``.

    References
    ----------
    Nakajima, Sugiyama, Babacan, Tomioka, "Global analytic solution of fully-observed variational
    Bayesian matrix factorization", JMLR 14:1-37, 2013. Nakajima, Tomioka, Sugiyama, Babacan,
    "Condition for perfect dimensionality recovery by variational Bayesian PCA", JMLR 16, 2015.
    """
    dims = tuple(int(n) for n in shape)
    if len(dims) != 2 or min(dims) < 1:
        raise ValueError(f"shape must be two positive sizes (L, M), got {tuple(shape)}")
    L, M = min(dims), max(dims)
    s = np.asarray(singular_values, dtype=np.float64)
    if s.shape != (L,):
        raise ValueError(
            f"expected min(L, M) = {L} singular values for a {dims[0]} x {dims[1]} matrix, got array of shape {s.shape}"
        )
    if not np.isfinite(s).all():
        raise ValueError(f"singular values must be finite, got {int((~np.isfinite(s)).sum())} NaN or inf")
    if (s < 0).any():
        raise ValueError(f"singular values must be >= 0, got minimum {s.min()!r}")
    s = np.sort(s)[::-1].copy()
    s.flags.writeable = False
    x_bar = _x_bar(L, M)

    if sigma2 is not None:
        sigma2 = float(sigma2)
        if not (math.isfinite(sigma2) and sigma2 >= 0.0):
            raise ValueError(f"sigma2 must be a finite variance >= 0, got {sigma2!r}")
    else:
        s2 = s * s
        upper = float(s2.sum()) / (L * M)
        if upper <= 0.0:
            return VBMFResult(rank=0, sigma2=0.0, threshold=0.0, singular_values=s, shape=(L, M))
        h_max = (L * M + L + M - 1) // (L + M) - 1  # ceil(L / (1 + alpha)) - 1, in integers
        lower = max(float(s2[h_max]) / (M * x_bar), float(s2[h_max:].mean()) / M)
        ratio = min(max(lower / upper, _MIN_SIGMA2_RATIO), 1.0)
        if ratio >= 1.0:
            t = 0.0
        else:
            q = s2 / (M * upper)
            t = _minimise_log_sigma2(q, L, L / M, x_bar, math.log(ratio))
        sigma2 = upper * math.exp(t)

    threshold = math.sqrt(M * sigma2 * x_bar)
    rank = int(np.count_nonzero(s > threshold))
    return VBMFResult(rank=rank, sigma2=sigma2, threshold=threshold, singular_values=s, shape=(L, M))


def gram_singular_values(matrix) -> np.ndarray:
    """Singular values of a 2-D matrix from the eigenvalues of the Gram matrix of its smaller side.

    With ``A`` oriented ``L x M``, ``L <= M``: ``A A^T = U diag(s^2) U^T``, so ``s = sqrt(eig(A A^T))``.
    The product and the ``L x L`` symmetric eigenproblem (``numpy.linalg.eigvalsh``) run in float64;
    eigenvalues are clipped at 0 first. Values far below ``sqrt(eps) * s_1`` carry only rounding
    noise, which does not matter for rank selection.

    Parameters
    ----------
    matrix : array_like
        A 2-D array of any real float dtype.

    Returns
    -------
    numpy.ndarray
        The ``min(L, M)`` singular values, descending, float64.
    """
    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {a.shape}")
    if a.shape[0] > a.shape[1]:
        a = a.T
    gram = a @ a.T
    if not np.isfinite(gram).all():
        raise ValueError(f"matrix of shape {a.shape} has NaN or inf entries, or entries too large to square in float64")
    eigenvalues = np.linalg.eigvalsh(gram)  # ascending
    return np.sqrt(np.clip(eigenvalues[::-1], 0.0, None))


def evbmf(matrix, sigma2=None) -> VBMFResult:
    """EVBMF rank, noise variance and threshold of a 2-D matrix.

    The singular values come from :func:`gram_singular_values` (float64 Gram matrix of the smaller
    side, ``s = sqrt(eig(A A^T))``); the rest is :func:`evbmf_from_singular_values`, which carries
    the threshold ``sqrt(M sigma^2 x_bar)`` and the ``sigma^2`` search.

    Parameters
    ----------
    matrix : array_like
        A 2-D array (float16/32/64; computed in float64), either orientation.
    sigma2 : float, optional
        Known noise variance of the entries; ``None`` (default) estimates it.

    Returns
    -------
    VBMFResult

    References
    ----------
    Nakajima, Sugiyama, Babacan, Tomioka, "Global analytic solution of fully-observed variational
    Bayesian matrix factorization", JMLR 14:1-37, 2013.
    """
    a = np.asarray(matrix)
    if a.ndim != 2:
        raise ValueError(f"evbmf needs a 2-D matrix, got shape {a.shape}")
    if min(a.shape) < 1:
        raise ValueError(f"evbmf needs a non-empty matrix, got shape {a.shape}")
    return evbmf_from_singular_values(gram_singular_values(a), a.shape, sigma2)
