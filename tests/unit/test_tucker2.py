"""Tucker-2 / SVD decomposition (onnxfactor.methods.tucker2), without ONNX: exactness, error
bounds of the truncated HOSVD, chain shapes and roles, parameter and MAC counts, HOOI, rank checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxfactor import _tensorly
from onnxfactor.methods.base import ConvGeometry, dense_weight
from onnxfactor.methods.tucker2 import decompose, weight_spectra
from onnxfactor.spectral import unfold


def geometry(weight_shape, group: int = 1, **attrs) -> ConvGeometry:
    return ConvGeometry.from_attrs({"group": group, **attrs}, weight_shape)


def rel_error(weight: np.ndarray, group: int, chain) -> float:
    w = dense_weight(np.asarray(weight, dtype=np.float64), group)
    return float(np.linalg.norm(chain.reconstruct() - w) / np.linalg.norm(w))


def orthonormal(rng: np.random.Generator, n: int, r: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return q


def multilinear(rng: np.random.Generator, o: int, i: int, kernel, r_out: int, r_in: int) -> np.ndarray:
    """``core x_0 U x_1 V``: exact multilinear rank ``(r_out, r_in)`` on the channel modes."""
    core = rng.standard_normal((r_out, r_in, *kernel))
    return np.einsum("rs...,or,is->oi...", core, orthonormal(rng, o, r_out), orthonormal(rng, i, r_in))


def project(w: np.ndarray, u: np.ndarray | None, v: np.ndarray | None) -> np.ndarray:
    """``W x_0 U U^T x_1 V V^T`` in float64 (the best approximation with those orthonormal factors)."""
    w = np.asarray(w, dtype=np.float64)
    if u is not None:
        w = np.einsum("oi...,or,pr->pi...", w, u, u)
    if v is not None:
        w = np.einsum("oi...,is,js->oj...", w, v, v)
    return w


def full_ranks(weight_shape, group: int) -> dict:
    o, i = weight_shape[0] // group, weight_shape[1]
    if all(k == 1 for k in weight_shape[2:]):
        return {"rank": min(o, i)}
    return {"out": o, "in": i}


# (id, weight shape (C_out, C_in / g, *k), group)
FULL_RANK_CASES = [
    ("k3", (12, 8, 3, 3), 1),
    ("k3_g2", (12, 4, 3, 3), 2),
    ("k3_g4", (16, 4, 3, 3), 4),
    ("k5x3", (10, 6, 5, 3), 1),
    ("first_conv_tall", (64, 3, 3, 3), 1),  # out-mode unfolding 64 x 27: the basis beyond R = 27
    ("conv1d", (12, 8, 5), 1),
    ("conv1d_g2", (8, 4, 3), 2),
    ("conv3d", (8, 6, 3, 3, 3), 1),
    ("conv3d_g2", (8, 3, 2, 2, 2), 2),
    ("pointwise_tall", (64, 16, 1, 1), 1),
    ("pointwise_wide", (16, 64, 1, 1), 1),
    ("pointwise_square", (24, 24, 1, 1), 1),
    ("pointwise_g2_tall", (24, 4, 1, 1), 2),
    ("pointwise_g2_wide", (8, 12, 1, 1), 2),
    ("pointwise_conv1d", (12, 20, 1), 1),
]


@pytest.mark.parametrize("shape, group", [c[1:] for c in FULL_RANK_CASES], ids=[c[0] for c in FULL_RANK_CASES])
def test_full_rank_reconstruction_is_exact(shape, group):
    weight = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    chain = decompose(weight, geometry(shape, group), full_ranks(shape, group))
    assert rel_error(weight, group, chain) < 1e-5
    assert all(c.weight.dtype == np.float32 for c in chain.convs)


@pytest.mark.parametrize("r_out, r_in", [(12, None), (None, 8)])
def test_full_rank_single_mode_is_exact(r_out, r_in):
    weight = np.random.default_rng(1).standard_normal((12, 8, 3, 3)).astype(np.float32)
    chain = decompose(weight, geometry(weight.shape), {"out": r_out, "in": r_in})
    assert rel_error(weight, 1, chain) < 1e-5


# (id, per-group (o, i, *k), group, (r_out, r_in))
KNOWN_RANK_CASES = [
    ("k3", (64, 32, 3, 3), 1, (12, 7)),
    ("k3_big", (128, 64, 3, 3), 1, (20, 10)),
    ("k3_g2", (32, 16, 3, 3), 2, (5, 9)),
    ("k3_g4", (16, 12, 3, 3), 4, (6, 4)),
    ("conv1d", (48, 24, 5), 1, (8, 5)),
    ("conv3d", (32, 16, 3, 3, 3), 1, (6, 4)),
]


@pytest.mark.parametrize(
    "group_shape, group, ranks", [c[1:] for c in KNOWN_RANK_CASES], ids=[c[0] for c in KNOWN_RANK_CASES]
)
def test_known_multilinear_rank_is_exact(group_shape, group, ranks):
    rng = np.random.default_rng(2)
    o, i, *kernel = group_shape
    weight = np.concatenate([multilinear(rng, o, i, kernel, *ranks) for _ in range(group)]).astype(np.float32)
    chain = decompose(weight, geometry(weight.shape, group), {"out": ranks[0], "in": ranks[1]})
    assert rel_error(weight, group, chain) < 1e-5
    # one rank short on either mode loses a real component
    short = decompose(weight, geometry(weight.shape, group), {"out": ranks[0] - 1, "in": ranks[1]})
    assert rel_error(weight, group, short) > 1e-2


def test_known_matrix_rank_pointwise_is_exact():
    rng = np.random.default_rng(3)
    for o, i in [(64, 16), (16, 64)]:
        weight = (rng.standard_normal((o, 6)) @ rng.standard_normal((6, i))).reshape(o, i, 1, 1).astype(np.float32)
        chain = decompose(weight, geometry(weight.shape), {"rank": 6})
        assert rel_error(weight, 1, chain) < 1e-5


def mode_tail(weight: np.ndarray, mode: int, rank: int) -> float:
    """``sqrt(sum of dropped s^2)`` of the mode unfolding (numpy SVD, float64)."""
    s = np.linalg.svd(unfold(np.asarray(weight, np.float64), mode), compute_uv=False)
    return float(np.sqrt(np.sum(s[rank:] ** 2)))


def hosvd_reference(weight: np.ndarray, r_out, r_in) -> float:
    """Relative error of the truncated HOSVD computed here with numpy SVD (float64)."""
    w = np.asarray(weight, np.float64)
    u = np.linalg.svd(unfold(w, 0), full_matrices=False)[0][:, :r_out] if r_out else None
    v = np.linalg.svd(unfold(w, 1), full_matrices=False)[0][:, :r_in] if r_in else None
    return float(np.linalg.norm(w - project(w, u, v)) / np.linalg.norm(w))


@pytest.mark.parametrize("shape", [(32, 24, 3, 3), (24, 40, 5), (16, 12, 3, 3, 3)], ids=["k3", "conv1d", "conv3d"])
@pytest.mark.parametrize("r_out, r_in", [(4, 3), (8, 8), (16, 2), (1, 1), (10, None), (None, 6)])
def test_truncated_error_within_hosvd_bounds(shape, r_out, r_in):
    rng = np.random.default_rng(4)
    # a decaying channel spectrum so truncation errors are neither ~0 nor ~1
    decay = 1.0 / (1.0 + 0.2 * np.arange(shape[0]))
    weight = (rng.standard_normal(shape) * decay.reshape(-1, *([1] * (len(shape) - 1)))).astype(np.float32)
    err = rel_error(weight, 1, decompose(weight, geometry(shape), {"out": r_out, "in": r_in}))
    norm = float(np.linalg.norm(weight.astype(np.float64)))
    tail_out = mode_tail(weight, 0, r_out) / norm if r_out else 0.0
    tail_in = mode_tail(weight, 1, r_in) / norm if r_in else 0.0
    # any approximation of mode ranks (r_out, r_in) is at least as far as the best one on each mode
    # alone (Eckart-Young); the truncated HOSVD is at most sqrt(tail_0^2 + tail_1^2) away
    # (De Lathauwer, De Moor, Vandewalle, SIAM J. Matrix Anal. Appl. 21(4), 2000, Property 10).
    assert err >= max(tail_out, tail_in) - 1e-6
    assert err <= math.hypot(tail_out, tail_in) + 1e-6
    # and it is the truncated HOSVD: the same error as one computed here with numpy SVD
    assert err == pytest.approx(hosvd_reference(weight, r_out, r_in), rel=1e-4, abs=1e-6)
    if r_out is None or r_in is None:  # one mode: exactly the Eckart-Young error
        assert err == pytest.approx(max(tail_out, tail_in), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("group", [2, 4])
def test_grouped_truncation_is_per_group_hosvd(group):
    rng = np.random.default_rng(5)
    o, i = 12, 8
    weight = rng.standard_normal((group * o, i, 3, 3)).astype(np.float32)
    r_out, r_in = 5, 3
    chain = decompose(weight, geometry(weight.shape, group), {"out": r_out, "in": r_in})
    recon = chain.reconstruct()
    for g in range(group):
        wg = weight[g * o : (g + 1) * o].astype(np.float64)
        block = recon[g * o : (g + 1) * o, g * i : (g + 1) * i]
        expected = hosvd_reference(wg, r_out, r_in)
        assert np.linalg.norm(block - wg) / np.linalg.norm(wg) == pytest.approx(expected, rel=1e-4)
        # nothing leaks outside the group's diagonal block
        off = np.delete(recon[g * o : (g + 1) * o], np.s_[g * i : (g + 1) * i], axis=1)
        assert np.abs(off).max() == 0.0


@pytest.mark.parametrize("o, i, rank", [(64, 16, 5), (16, 64, 5), (24, 24, 10)])
def test_pointwise_truncation_is_eckart_young(o, i, rank):
    weight = np.random.default_rng(6).standard_normal((o, i, 1, 1)).astype(np.float32)
    s = np.linalg.svd(weight.reshape(o, i).astype(np.float64), compute_uv=False)
    expected = math.sqrt(np.sum(s[rank:] ** 2) / np.sum(s**2))
    err = rel_error(weight, 1, decompose(weight, geometry(weight.shape), {"rank": rank}))
    assert err == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Chain shapes and roles


# (id, C_out, C_in, kernel, group, r_out, r_in)
CHAIN_CASES = [
    ("k3", 32, 16, (3, 3), 1, 8, 4),
    ("k3_g2", 32, 16, (3, 3), 2, 6, 5),
    ("k3_g4", 32, 16, (3, 3), 4, 3, 2),
    ("k5x3_out_only", 32, 16, (5, 3), 1, 8, None),
    ("k3_in_only", 32, 16, (3, 3), 1, None, 4),
    ("k3_g2_out_only", 32, 16, (3, 3), 2, 6, None),
    ("k3_g2_in_only", 32, 16, (3, 3), 2, None, 5),
    ("conv1d", 24, 12, (5,), 1, 6, 3),
    ("conv3d_g2", 16, 8, (3, 3, 3), 2, 4, 2),
]


@pytest.mark.parametrize(
    "c_out, c_in, kernel, group, r_out, r_in", [c[1:] for c in CHAIN_CASES], ids=[c[0] for c in CHAIN_CASES]
)
def test_tucker2_chain_shapes_and_roles(c_out, c_in, kernel, group, r_out, r_in):
    shape = (c_out, c_in // group, *kernel)
    weight = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    chain = decompose(weight, geometry(shape, group, strides=[2] * len(kernel)), {"out": r_out, "in": r_in})
    ones = (1,) * len(kernel)
    g = group
    expected = []  # (role, weight shape, carries_geometry, takes_bias, at_input_resolution)
    if r_in is not None:
        expected.append(("in", (g * r_in, c_in // g, *ones), False, False, True))
    core_out = g * r_out if r_out is not None else c_out
    core_in = r_in if r_in is not None else c_in // g
    expected.append(("core", (core_out, core_in, *kernel), True, r_out is None, False))
    if r_out is not None:
        expected.append(("out", (c_out, r_out, *ones), False, True, False))
    got = [(c.role, c.weight.shape, c.carries_geometry, c.takes_bias, c.at_input_resolution) for c in chain.convs]
    assert got == expected
    assert all(c.group == group for c in chain.convs)
    assert chain.method == "tucker2"
    assert chain.ranks == {"out": r_out, "in": r_in}
    # exactly one geometry conv, and the bias goes on the last conv
    assert sum(c.carries_geometry for c in chain.convs) == 1
    assert [c.takes_bias for c in chain.convs] == [False] * (len(chain.convs) - 1) + [True]


@pytest.mark.parametrize("o, i, group, rank", [(64, 16, 1, 5), (16, 64, 1, 5), (24, 8, 2, 3), (8, 24, 2, 3)])
def test_svd_chain_shapes_and_roles(o, i, group, rank):
    shape = (o, i // group, 1, 1)
    weight = np.random.default_rng(8).standard_normal(shape).astype(np.float32)
    chain = decompose(weight, geometry(shape, group, strides=[2, 2], pads=[1, 0, 0, 1]), {"rank": rank})
    got = [(c.role, c.weight.shape, c.group, c.carries_geometry, c.takes_bias, c.at_input_resolution) for c in chain.convs]
    # the first conv carries the geometry (no bias, so padded zeros stay zero); the second takes the bias
    assert got == [
        ("svd_a", (group * rank, i // group, 1, 1), group, True, False, False),
        ("svd_b", (o, rank, 1, 1), group, False, True, False),
    ]
    assert (chain.method, chain.ranks) == ("svd", {"rank": rank})


def test_params_and_macs_hand_computed():
    # C_in = 64, C_out = 128, 3 x 3, R_in = 16, R_out = 32, stride 2 on a 32 x 32 input -> 16 x 16
    weight = np.random.default_rng(9).standard_normal((128, 64, 3, 3)).astype(np.float32)
    chain = decompose(weight, geometry(weight.shape, strides=[2, 2], pads=[1, 1, 1, 1]), {"out": 32, "in": 16})
    in_spatial, out_spatial = 32 * 32, 16 * 16
    # first 16 x 64 = 1024 weights at 1024 positions; core 32 x 16 x 9 = 4608 at 256; last 128 x 32 = 4096 at 256
    assert [c.params for c in chain.convs] == [1024, 4608, 4096]
    assert [c.macs(in_spatial, out_spatial) for c in chain.convs] == [1_048_576, 1_179_648, 1_048_576]
    assert chain.params == 9728
    assert chain.macs(in_spatial, out_spatial) == 3_276_800
    # against the original conv: 73728 weights, 18,874,368 MACs
    assert 128 * 64 * 9 == 73728 and 73728 * out_spatial == 18_874_368


def test_params_and_macs_grouped_and_pointwise():
    # grouped g = 4, C_in = C_out = 32 (8 per group), 3 x 3, R_in = 2, R_out = 3, 8 x 8 -> 8 x 8
    weight = np.random.default_rng(10).standard_normal((32, 8, 3, 3)).astype(np.float32)
    chain = decompose(weight, geometry(weight.shape, 4), {"out": 3, "in": 2})
    # first (8, 8, 1, 1) = 64; core (12, 2, 3, 3) = 216; last (32, 3, 1, 1) = 96
    assert [c.params for c in chain.convs] == [64, 216, 96]
    assert chain.macs(64, 64) == (64 + 216 + 96) * 64
    # pointwise 64 -> 128 at rank 10, stride 2 (the geometry conv computes at the output size)
    weight = np.random.default_rng(11).standard_normal((128, 64, 1, 1)).astype(np.float32)
    chain = decompose(weight, geometry(weight.shape, strides=[2, 2]), {"rank": 10})
    assert [c.params for c in chain.convs] == [640, 1280]
    assert chain.macs(32 * 32, 16 * 16) == (640 + 1280) * 256


# ------------------------------------------------------------------------------------------------
# HOOI


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hooi_never_worse_than_hosvd_and_orthonormal(seed):
    rng = np.random.default_rng(100 + seed)
    shape, ranks = (24, 16, 3, 3), (6, 4)
    weight = rng.standard_normal(shape).astype(np.float32)
    w64 = weight.astype(np.float64)
    spectra = weight_spectra(weight, geometry(shape))
    u0, v0 = spectra.out[0].vectors[:, : ranks[0]], spectra.in_[0].vectors[:, : ranks[1]]
    u, v = _tensorly.hooi_channel_factors(weight, ranks, 5)

    assert u.shape == (24, 6) and v.shape == (16, 4)
    np.testing.assert_allclose(u.T @ u, np.eye(6), atol=1e-8, rtol=0)
    np.testing.assert_allclose(v.T @ v, np.eye(4), atol=1e-8, rtol=0)
    norm = np.linalg.norm(w64)
    err_hosvd = np.linalg.norm(w64 - project(w64, u0, v0)) / norm
    err_hooi = np.linalg.norm(w64 - project(w64, u, v)) / norm
    assert err_hooi <= err_hosvd + 1e-9
    assert err_hooi < err_hosvd - 1e-6  # HOOI does refine a random weight

    # the chain built with hooi_iters uses those factors (float32 weights: 1e-6)
    hosvd_chain = decompose(weight, geometry(shape), {"out": 6, "in": 4}, spectra=spectra)
    hooi_chain = decompose(weight, geometry(shape), {"out": 6, "in": 4}, spectra=spectra, hooi_iters=5)
    assert rel_error(weight, 1, hooi_chain) == pytest.approx(err_hooi, abs=1e-6)
    assert rel_error(weight, 1, hosvd_chain) == pytest.approx(err_hosvd, abs=1e-6)


def test_hooi_grouped_and_exact_at_known_rank():
    rng = np.random.default_rng(12)
    weight = np.concatenate([multilinear(rng, 12, 8, (3, 3), 4, 3) for _ in range(2)]).astype(np.float32)
    chain = decompose(weight, geometry(weight.shape, 2), {"out": 4, "in": 3}, hooi_iters=5)
    assert rel_error(weight, 2, chain) < 1e-5
    hosvd = decompose(weight, geometry(weight.shape, 2), {"out": 3, "in": 2})
    hooi = decompose(weight, geometry(weight.shape, 2), {"out": 3, "in": 2}, hooi_iters=5)
    assert rel_error(weight, 2, hooi) <= rel_error(weight, 2, hosvd) + 1e-6


# ------------------------------------------------------------------------------------------------
# Rank checks


@pytest.mark.parametrize(
    "shape, group, ranks, message",
    [
        ((12, 8, 3, 3), 1, {"out": 0, "in": 3}, r"output-mode rank 0 is out of range: it must be in \[1, 12\]"),
        ((12, 8, 3, 3), 1, {"out": 13, "in": 3}, r"output-mode rank 13 is out of range: it must be in \[1, 12\]"),
        ((12, 8, 3, 3), 1, {"out": 3, "in": 9}, r"input-mode rank 9 is out of range: it must be in \[1, 8\]"),
        ((12, 8, 3, 3), 1, {"out": None, "in": -1}, r"input-mode rank -1 .* \[1, 8\]"),
        ((12, 4, 3, 3), 2, {"out": 7, "in": 2}, r"output-mode rank 7 .* \[1, 6\]"),  # per group
        ((64, 16, 1, 1), 1, {"rank": 0}, r"SVD rank 0 is out of range: it must be in \[1, 16\]"),
        ((16, 64, 1, 1), 1, {"rank": 17}, r"SVD rank 17 .* \[1, 16\]"),
        ((24, 4, 1, 1), 2, {"rank": 5}, r"SVD rank 5 .* \[1, 4\]"),
        ((12, 8, 3, 3), 1, {"out": None, "in": None}, r"both ranks are None"),
    ],
)
def test_out_of_range_ranks_raise(shape, group, ranks, message):
    weight = np.random.default_rng(13).standard_normal(shape).astype(np.float32)
    with pytest.raises(ValueError, match=message):
        decompose(weight, geometry(shape, group), ranks)


def test_input_rank_without_input_spectra_raises():
    weight = np.random.default_rng(14).standard_normal((12, 8, 3, 3)).astype(np.float32)
    spectra = weight_spectra(weight, geometry(weight.shape), in_mode=False)
    with pytest.raises(ValueError, match="input-mode spectra were not computed"):
        decompose(weight, geometry(weight.shape), {"out": 4, "in": 3}, spectra=spectra)
