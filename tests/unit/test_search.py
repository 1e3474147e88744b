"""The cheapest chain for a target error (onnxfactor.methods.search, cp.chain_for_error) and the
numpy CP-ALS (onnxfactor.methods.als), without ONNX."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from onnxfactor import _tensorly
from onnxfactor.methods import METHODS, als, cp, tucker2, tucker3
from onnxfactor.methods.search import CostModel
from tests.unit.test_cp import exact_cp3, geometry, rel_error, spatial_tucker
from tests.unit.test_policies import add_noise, orthonormal

GEOMETRIES = [
    ({"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, (13, 11), (13, 11)),
    ({"kernel_shape": [3, 3], "strides": [2, 2]}, (13, 11), (6, 5)),
    ({"kernel_shape": [5]}, (20,), (16,)),
]


@pytest.mark.parametrize("attrs,in_hw,out_hw", GEOMETRIES, ids=["pad1", "stride2", "conv1d"])
@pytest.mark.parametrize("group", [1, 2])
def test_cost_model_is_the_chains_mac_count(attrs, in_hw, out_hw, group):
    rng = np.random.default_rng(0)
    kernel = attrs["kernel_shape"]
    w = rng.standard_normal((12 * group, 10, *kernel)).astype(np.float32)
    geo = geometry(w.shape, group, **attrs)
    s_in, s_out = math.prod(in_hw), math.prod(out_hw)
    cost = CostModel.of(w.shape, geo, s_in, s_out)
    assert cost.original() == w.size * s_out
    spectra = tucker3.weight_spectra(w, geo)
    k = math.prod(kernel)
    for r_out, r_in in itertools.product((3, 12), (4, 10)):
        ranks = {"out": r_out if r_out < 12 else None, "in": r_in if r_in < 10 else None}
        if ranks["out"] is None and ranks["in"] is None:
            continue
        assert tucker2.decompose(w, geo, ranks, spectra=spectra).macs(s_in, s_out) == cost.tucker2(r_out, r_in)
        for r_s in (2, k):
            chain = tucker3.decompose(w, geo, {**ranks, "spatial": r_s if r_s < k else None}, spectra=spectra)
            assert chain.macs(s_in, s_out) == cost.tucker3(r_out, r_in, r_s)
    chain = cp.decompose(w, geo, {"rank": 5}, variant="cp3")
    assert chain.macs(s_in, s_out) == 5 * cost.cp_per_rank("cp3")
    # CP-4's per-rank cost is a lower bound (its per-axis convs run between the two resolutions)
    chain = cp.decompose(w, geo, {"rank": 5}, variant="cp4")
    assert 5 * cost.cp_per_rank("cp4") <= chain.macs(s_in, s_out)


def _brute_force(method, w, geo, cost, target, spatial: bool):
    """The cheapest rank combination meeting ``target``, by decomposing at every combination."""
    o, i, k = w.shape[0], w.shape[1], math.prod(w.shape[2:])
    best = None
    for r_out, r_in, r_s in itertools.product(range(1, o + 1), range(1, i + 1), range(1, k + 1) if spatial else [k]):
        if (r_out, r_in, r_s) == (o, i, k):
            continue
        ranks = {"out": r_out if r_out < o else None, "in": r_in if r_in < i else None}
        if spatial:
            ranks["spatial"] = r_s if r_s < k else None
        chain = method.decompose(w, geo, ranks)
        macs = cost.tucker3(r_out, r_in, r_s) if spatial else cost.tucker2(r_out, r_in)
        if chain.rel_error <= target and macs < cost.original() and (best is None or (macs, chain.rel_error) < best[0]):
            best = ((macs, chain.rel_error), chain.ranks)
    return None if best is None else best[1]


@pytest.mark.parametrize("method,spatial", [(tucker2, False), (tucker3, True)], ids=["tucker2", "tucker3"])
@pytest.mark.parametrize("target", [0.2, 0.5, 0.8])
def test_tucker_search_is_the_cheapest_combination(method, spatial, target):
    rng = np.random.default_rng(1)
    w = add_noise(rng, spatial_tucker(rng, 7, 6, (2, 2), (3, 4, 2)), 0.3).astype(np.float32)
    geo = geometry(w.shape, 1, kernel_shape=[2, 2], strides=[2, 2])
    cost = CostModel.of(w.shape, geo, 64, 16)
    chain = method.chain_for_error(w, geo, target, spectra=tucker3.weight_spectra(w, geo), cost=cost)
    expected = _brute_force(method, w, geo, cost, target, spatial)
    assert (chain.ranks if chain is not None else None) == expected
    if chain is not None:
        assert chain.rel_error <= target and rel_error(w, 1, chain) == pytest.approx(chain.rel_error, abs=1e-6)


def test_tucker_search_finds_exact_multilinear_ranks():
    rng = np.random.default_rng(2)
    w = spatial_tucker(rng, 16, 12, (3, 3), (3, 4, 9)).astype(np.float32)
    geo = geometry(w.shape, 1, kernel_shape=[3, 3])
    spectra = tucker3.weight_spectra(w, geo)
    cost = CostModel.of(w.shape, geo, 100, 100)
    chain = tucker2.chain_for_error(w, geo, 1e-5, spectra=spectra, cost=cost)
    assert chain.ranks == {"out": 3, "in": 4} and chain.rel_error < 1e-5
    w3 = spatial_tucker(rng, 16, 12, (3, 3), (3, 4, 2)).astype(np.float32)
    chain = tucker3.chain_for_error(w3, geo, 1e-5, spectra=tucker3.weight_spectra(w3, geo), cost=cost)
    assert chain.ranks["spatial"] == 2 and chain.ranks["in"] == 4 and chain.rel_error < 1e-5


def test_tucker_search_respects_step_and_max_cost():
    rng = np.random.default_rng(3)
    w = add_noise(rng, spatial_tucker(rng, 40, 36, (3, 3), (10, 11, 9)), 0.05).astype(np.float32)
    geo = geometry(w.shape, 1, kernel_shape=[3, 3])
    spectra = tucker3.weight_spectra(w, geo)
    cost = CostModel.of(w.shape, geo, 1, 1)
    free = tucker2.chain_for_error(w, geo, 0.1, spectra=spectra, cost=cost)
    stepped = tucker2.chain_for_error(w, geo, 0.1, spectra=spectra, cost=cost, step=8)
    assert all(r is None or r % 8 == 0 for r in stepped.ranks.values())
    assert stepped.macs(1, 1) >= free.macs(1, 1) and stepped.rel_error <= 0.1
    assert tucker2.chain_for_error(w, geo, 0.1, spectra=spectra, cost=cost, max_cost=free.macs(1, 1)) is None


def test_pointwise_search_is_eckart_young():
    rng = np.random.default_rng(4)
    u, v = orthonormal(rng, 12, 12), orthonormal(rng, 8, 8)
    s = np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05])
    w = (u[:, :8] * s @ v.T).reshape(12, 8, 1, 1).astype(np.float32)
    geo = geometry(w.shape, 1)
    target = float(np.sqrt(np.sum(s[4:] ** 2) / np.sum(s**2))) + 1e-6
    chain = tucker2.chain_for_error(w, geo, target, spectra=tucker2.weight_spectra(w, geo), cost=CostModel.of(w.shape, geo, 1, 1))
    assert chain.ranks == {"rank": 4}


def test_cp_search_finds_the_exact_rank_within_the_cost_cap():
    rng = np.random.default_rng(5)
    w = exact_cp3(rng, 12, 8, (3, 3), 5).astype(np.float32)
    geo = geometry(w.shape, 1, kernel_shape=[3, 3])
    cost = CostModel.of(w.shape, geo, 1, 1)
    spectra = cp.weight_spectra(w, geo)
    chain = cp.CP3.chain_for_error(w, geo, 1e-4, spectra=spectra, cost=cost)
    assert chain.ranks == {"rank": 5} and chain.rel_error <= 1e-4
    # a cost cap below rank 5's cost: none; ranks restricted to multiples of 2: 6
    assert cp.CP3.chain_for_error(w, geo, 1e-4, spectra=spectra, cost=cost, max_cost=5 * cost.cp_per_rank("cp3")) is None
    assert cp.chain_for_error(w, geo, 1e-4, "cp3", step=2).ranks == {"rank": 6}


def test_eckart_young_bound_is_below_the_cp_rank():
    rng = np.random.default_rng(6)
    for rank in (3, 7):
        w = exact_cp3(rng, 12, 10, (3, 3), rank)
        fitters = [cp.CPFitter(w)]
        assert cp._eckart_young_rank(fitters, 1e-6) <= rank
    w = np.zeros((6, 5, 3, 3))
    w[:3, :3, 0, 0] = np.diag([3.0, 2.0, 1.0])  # matrix rank 3 on every unfolding: CP rank 3
    assert cp._eckart_young_rank([cp.CPFitter(w)], 1e-6) == 3


# ------------------------------------------------------------------------------------------------
# CP-ALS


@pytest.mark.parametrize("shape,rank,fit_rank", [((12, 8, 9), 5, 5), ((30, 20, 9), None, 6), ((10, 6, 3, 3), 4, 4)])
def test_numpy_als_matches_tensorly(shape, rank, fit_rank):
    rng = np.random.default_rng(7)
    if rank is None:
        t = rng.standard_normal(shape)
    else:
        t = cp.cp_to_dense(np.ones(rank), [rng.standard_normal((n, rank)) for n in shape])
    lam, factors, err = als.cp_als(t, fit_rank, n_iter_max=200)
    assert err == pytest.approx(cp._rel_error(t, lam, factors), abs=1e-6)  # the cheap formula cancels near 0
    assert np.allclose(np.linalg.norm(factors[0], axis=0), 1.0)
    lam_t, factors_t = _tensorly.parafac(t, fit_rank, n_iter_max=200, tol=1e-8)
    reference = cp._rel_error(t, lam_t, factors_t)
    assert err <= reference + 1e-3
    if rank is not None:
        assert err < 1e-3  # an exact low-rank tensor is recovered


def test_numpy_als_continues_from_an_init_without_raising_the_error():
    rng = np.random.default_rng(8)
    t = rng.standard_normal((15, 12, 9))
    lam, factors, err = als.cp_als(t, 6, n_iter_max=10)
    lam2, factors2, err2 = als.cp_als(t, 6, (lam, factors), n_iter_max=5, tol=0)
    assert err2 <= err + 1e-12
    with pytest.raises(ValueError, match="do not match"):
        als.cp_als(t, 5, (lam, factors))


def test_every_method_offers_a_search():
    for name, method in METHODS.items():
        assert callable(method.chain_for_error), name
