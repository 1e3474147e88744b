"""EVBMF (onnxfactor.ranks.vbmf): rank and noise recovery, invariances, edge cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from onnxfactor.ranks.vbmf import VBMFResult, evbmf, evbmf_from_singular_values, gram_singular_values

SHAPES = [(100, 100), (64, 300), (300, 64), (128, 1152)]
SIGMA = 0.5


def low_rank_plus_noise(shape, rank, sigma, seed, strength=(3.0, 6.0)):
    """``U diag(s) V^T + sigma * N(0, 1)`` with ``s`` spread over ``strength`` x the noise edge."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    u, _ = np.linalg.qr(rng.standard_normal((rows, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, rank)))
    edge = sigma * (math.sqrt(rows) + math.sqrt(cols))  # largest singular value of the noise
    s = np.linspace(*strength, rank) * edge
    return (u * s) @ v.T + sigma * rng.standard_normal(shape)


@pytest.mark.parametrize("rank", [5, 10, 20])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_recovers_rank_and_noise_variance(shape, rank):
    result = evbmf(low_rank_plus_noise(shape, rank, SIGMA, seed=1000 * rank + shape[0]))
    assert result.rank == rank
    assert abs(result.sigma2 / SIGMA**2 - 1.0) < 0.10
    assert result.shape == (min(shape), max(shape))
    s = result.singular_values
    assert s[rank - 1] > result.threshold >= s[rank]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES + [(2, 1000), (96, 864)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_pure_noise_gives_rank_zero(shape, seed):
    result = evbmf(2.0 * np.random.default_rng(seed).standard_normal(shape))
    assert result.rank == 0
    assert abs(result.sigma2 / 4.0 - 1.0) < 0.10
    assert result.threshold > result.singular_values[0]


@pytest.mark.parametrize("c", [1e-3, 1.0, 1e3])
def test_scale_invariance(c):
    a = low_rank_plus_noise((64, 300), 5, SIGMA, seed=7)
    base, scaled = evbmf(a), evbmf(c * a)
    assert base.rank == scaled.rank == 5
    np.testing.assert_allclose(scaled.sigma2, c**2 * base.sigma2, rtol=1e-6)
    np.testing.assert_allclose(scaled.threshold, c * base.threshold, rtol=1e-6)


@pytest.mark.parametrize("rank", [0, 8])
@pytest.mark.parametrize("shape", [(100, 100), (64, 300), (128, 1152)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_transposition_invariance(shape, rank):
    a = low_rank_plus_noise(shape, rank, SIGMA, seed=11)
    r, rt = evbmf(a), evbmf(a.T)
    assert r.rank == rt.rank == rank
    assert r.shape == rt.shape == (min(shape), max(shape))
    np.testing.assert_allclose(rt.sigma2, r.sigma2, rtol=1e-6)
    np.testing.assert_allclose(rt.singular_values, r.singular_values, rtol=1e-6, atol=1e-9 * r.singular_values[0])


@pytest.mark.parametrize("sigma2", [0.0, 0.05, SIGMA**2, 1.0, 100.0])
@pytest.mark.parametrize("shape", [(100, 100), (300, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_given_sigma2_is_used(shape, sigma2):
    a = low_rank_plus_noise(shape, 10, SIGMA, seed=3)
    result = evbmf(a, sigma2=sigma2)
    assert result.sigma2 == sigma2
    assert result.rank == int(np.count_nonzero(result.singular_values > result.threshold))
    L, M = result.shape
    assert result.threshold == pytest.approx(math.sqrt(M * sigma2 * _x_bar_reference(L, M)), rel=1e-9)
    if sigma2 == SIGMA**2:
        assert result.rank == 10
    if sigma2 == 100.0:
        assert result.rank == 0
    if sigma2 == 0.0:
        assert result.rank == min(shape)


def _x_bar_reference(L, M):
    """``(1 + t)(1 + alpha / t)`` at the zero of ``log(1 + t) + alpha log(1 + t / alpha) - t`` (plain bisection)."""
    alpha = L / M
    lo, hi = math.sqrt(alpha), 10.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if math.log1p(mid) + alpha * math.log1p(mid / alpha) - mid > 0:
            lo = mid
        else:
            hi = mid
    return (1 + lo) * (1 + alpha / lo)


def test_square_threshold_matches_the_paper_constant():
    # For L = M, tau_bar solves 2 log(1 + tau) = tau: tau_bar = kappa = 2.5129 (Nakajima et al., 2013),
    # so threshold^2 / (M sigma^2) = (1 + 2.5129)(1 + 1 / 2.5129) = 4.9108.
    result = evbmf_from_singular_values(np.ones(50), (50, 50), sigma2=1.0)
    assert result.threshold**2 / 50 == pytest.approx(4.9108, rel=1e-4)


@pytest.mark.parametrize("shape", [(50, 200), (200, 50), (64, 576)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gram_singular_values_match_svd(shape, dtype):
    a = np.random.default_rng(5).standard_normal(shape).astype(dtype)  # condition number < 3.5
    s = gram_singular_values(a)
    expected = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    assert s.dtype == np.float64 and s.shape == (min(shape),)
    assert np.all(np.diff(s) <= 0)
    np.testing.assert_allclose(s, expected, rtol=1e-6)


@pytest.mark.parametrize("sigma2", [None, 1.0])
@pytest.mark.parametrize("shape", [(5, 7), (7, 5), (1, 9), (1, 1), (64, 576)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_zero_matrix_gives_rank_zero_without_warnings(shape, sigma2):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evbmf(np.zeros(shape, dtype=np.float32), sigma2=sigma2)
    assert result.rank == 0
    assert result.sigma2 == (0.0 if sigma2 is None else sigma2)
    if sigma2 is None:
        assert result.threshold == 0.0


@pytest.mark.parametrize("shape", [(1, 50), (50, 1), (1, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_single_row_is_rank_zero(shape):
    # L = 1: H = ceil(L / (1 + alpha)) - 1 = 0, the sigma^2 bounds meet at gamma^2 / M.
    a = np.random.default_rng(2).standard_normal(shape) + 10.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evbmf(a)
    assert result.rank == 0
    assert result.sigma2 == pytest.approx(float(np.sum(a**2)) / max(shape), rel=1e-12)


@pytest.mark.parametrize("shape", [(6, 6), (10, 40), (3, 1000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_equal_singular_values_are_noise(shape):
    L, M = min(shape), max(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evbmf_from_singular_values(np.full(L, 3.0), shape)
        eye = evbmf(np.eye(*shape))
    assert result.rank == eye.rank == 0
    assert result.sigma2 == pytest.approx(9.0 / M, rel=1e-12)
    assert eye.sigma2 == pytest.approx(1.0 / M, rel=1e-12)


@pytest.mark.parametrize("rank", [1, 3, 12])
def test_exactly_low_rank_matrix_without_noise(rank):
    rng = np.random.default_rng(rank)
    a = rng.standard_normal((64, rank)) @ rng.standard_normal((rank, 576))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evbmf(a)
    assert result.rank == rank
    assert result.sigma2 < 1e-9 * np.mean(a**2)


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-5), (np.float16, 1e-2)])
def test_low_precision_inputs_are_computed_in_float64(dtype, rtol):
    a = low_rank_plus_noise((128, 1152), 10, SIGMA, seed=9)
    reference, low = evbmf(a), evbmf(a.astype(dtype))
    assert low.rank == reference.rank == 10
    assert low.singular_values.dtype == np.float64
    np.testing.assert_allclose(low.sigma2, reference.sigma2, rtol=rtol)


def test_singular_values_in_any_order_and_orientation():
    s = np.sort(evbmf(low_rank_plus_noise((40, 90), 4, SIGMA, seed=4)).singular_values)
    shuffled = np.random.default_rng(0).permutation(s)
    a, b = evbmf_from_singular_values(s, (40, 90)), evbmf_from_singular_values(shuffled, (90, 40))
    assert a.rank == b.rank == 4
    assert a.sigma2 == b.sigma2 and a.shape == b.shape == (40, 90)
    np.testing.assert_array_equal(a.singular_values, s[::-1])


@pytest.mark.parametrize(
    "values, shape, sigma2, match",
    [
        (np.ones(3), (4, 5), None, "expected min"),
        (np.array([1.0, -1.0]), (2, 5), None, ">= 0"),
        (np.array([1.0, np.nan]), (2, 5), None, "finite"),
        (np.ones(2), (0, 5), None, "positive sizes"),
        (np.ones(2), (2, 5), -1.0, "sigma2"),
    ],
)
def test_bad_inputs_raise_with_the_actual_value(values, shape, sigma2, match):
    with pytest.raises(ValueError, match=match):
        evbmf_from_singular_values(values, shape, sigma2)


def test_evbmf_rejects_non_2d_and_non_finite_matrices():
    with pytest.raises(ValueError, match="2-D"):
        evbmf(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="NaN or inf"):
        evbmf(np.array([[1.0, np.inf], [0.0, 1.0]]))


def test_result_checks_itself():
    with pytest.raises(ValueError, match="rank=5"):
        VBMFResult(rank=5, sigma2=1.0, threshold=1.0, singular_values=np.ones(3), shape=(3, 4))
