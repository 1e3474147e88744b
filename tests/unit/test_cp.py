"""CP-3 / CP-4 (onnxfactor.methods.cp) and spatial Tucker (onnxfactor.methods.tucker3), without
ONNX: exact recovery of exact CP / spatial-Tucker weights, the CP rank rules, degeneracy, chain
shapes and group attributes, per-axis geometry attributes, the rank search for a target error."""

from __future__ import annotations

import json
import math
import string

import numpy as np
import pytest

from onnxfactor import _tensorly
from onnxfactor.config import RankConfig
from onnxfactor.errors import UsageError
from onnxfactor.methods import METHODS, cp, tucker2, tucker3
from onnxfactor.methods.base import ChainSpec, ConvGeometry, ConvSpec, dense_weight, geometry_attrs
from onnxfactor.ranks import policies
from tests.unit.test_policies import add_noise, orthonormal

# ------------------------------------------------------------------------------------------------
# Weights of known structure (noise and orthonormal factors as in the rank-policy tests)


def exact_cp3(rng, o: int, i: int, kernel, rank: int, group: int = 1) -> np.ndarray:
    """A grouped weight whose every group is an exact rank-``rank`` CP of ``O x I x prod(kernel)``."""
    k = math.prod(kernel)
    groups = [
        np.einsum("or,ir,kr->oik", *(rng.standard_normal((n, rank)) for n in (o, i, k))).reshape(o, i, *kernel)
        for _ in range(group)
    ]
    return np.concatenate(groups, axis=0)


def exact_cp4(rng, o: int, i: int, kernel, rank: int, group: int = 1) -> np.ndarray:
    """A grouped weight whose every group is an exact rank-``rank`` CP of ``O x I x k_0 x ..``."""
    letters = string.ascii_lowercase[: len(kernel)]
    spec = "oR,iR," + ",".join(f"{c}R" for c in letters) + "->oi" + letters
    groups = [
        np.einsum(spec, *(rng.standard_normal((n, rank)) for n in (o, i, *kernel)), optimize=True) for _ in range(group)
    ]
    return np.concatenate(groups, axis=0)


def spatial_tucker(rng, o: int, i: int, kernel, ranks: tuple[int, int, int]) -> np.ndarray:
    """``G x_0 U x_1 V x_2 S`` on ``O x I x prod(kernel)``: multilinear rank ``ranks``, noise-free."""
    r_o, r_i, r_s = ranks
    k = math.prod(kernel)
    core = rng.standard_normal(ranks)
    w = np.einsum("abc,oa,ib,kc->oik", core, orthonormal(rng, o, r_o), orthonormal(rng, i, r_i), orthonormal(rng, k, r_s))
    return w.reshape(o, i, *kernel)


def geometry(weight_shape, group: int = 1, **attrs) -> ConvGeometry:
    return ConvGeometry.from_attrs({"group": group, **attrs}, weight_shape)


def rel_error(weight: np.ndarray, group: int, chain: ChainSpec) -> float:
    w = dense_weight(np.asarray(weight, dtype=np.float64), group)
    return float(np.linalg.norm(chain.reconstruct() - w) / np.linalg.norm(w))


# ------------------------------------------------------------------------------------------------
# Exact recovery


@pytest.mark.parametrize("kernel", [(3, 3), (5,), (3, 2, 3), (1, 3)], ids=str)
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("rank", [1, 5])
def test_cp3_recovers_exact_cp_weight(kernel, group, rank):
    rng = np.random.default_rng(rank * 10 + group)
    w = exact_cp3(rng, 12, 8, kernel, rank, group)
    geo = geometry(w.shape, group)
    chain = cp.decompose(w, geo, {"rank": rank}, spectra=cp.weight_spectra(w, geo))
    assert chain.method == "cp3" and chain.ranks == {"rank": rank}
    assert rel_error(w, group, chain) < 1e-5
    assert chain.rel_error < 1e-5


@pytest.mark.parametrize("kernel", [(3, 3), (5,), (3, 2, 3), (1, 3), (3, 1, 2)], ids=str)
@pytest.mark.parametrize("group", [1, 2])
def test_cp4_recovers_exact_cp4_weight(kernel, group):
    rng = np.random.default_rng(7 + group)
    w = exact_cp4(rng, 10, 6, kernel, 4, group)
    geo = geometry(w.shape, group)
    chain = cp.decompose(w, geo, {"rank": 4}, spectra=cp.weight_spectra(w, geo), variant="cp4")
    assert chain.method == "cp4"
    assert rel_error(w, group, chain) < 1e-5
    assert chain.rel_error < 1e-5


def test_cp3_recovers_a_cp4_weight_too():
    """A separable-kernel CP is also a CP of the 3-way weight."""
    w = exact_cp4(np.random.default_rng(3), 12, 8, (3, 3), 5)
    chain = cp.decompose(w, geometry(w.shape), {"rank": 5})
    assert rel_error(w, 1, chain) < 1e-5


@pytest.mark.parametrize("o,i,rank", [(12, 4, 6), (12, 3, 5)])
def test_cp3_rank_above_input_channels(o, i, rank):
    """R > C_in: no GEVD initialisation, ALS from the SVD initialisation still converges."""
    w = exact_cp3(np.random.default_rng(0), o, i, (3, 3), rank)
    chain = cp.decompose(w, geometry(w.shape), {"rank": rank}, n_iter_max=1000)
    assert rel_error(w, 1, chain) < 1e-5


def test_cp_without_spectra_matches_with_spectra():
    w = exact_cp3(np.random.default_rng(1), 12, 8, (3, 3), 4)
    geo = geometry(w.shape)
    a = cp.decompose(w, geo, {"rank": 4})
    b = cp.decompose(w, geo, {"rank": 4}, spectra=cp.weight_spectra(w, geo))
    np.testing.assert_allclose(a.reconstruct(), b.reconstruct(), atol=1e-5 * np.abs(w).max())


def test_cp_truncated_fit_reports_its_true_error():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 12, 3, 3))
    chain = cp.decompose(w, geometry(w.shape), {"rank": 6})
    assert 0.3 < chain.rel_error < 1.0
    assert chain.rel_error == pytest.approx(rel_error(w, 1, chain), rel=1e-5)


@pytest.mark.parametrize("variant", ["cp3", "cp4"])
def test_cp_on_pointwise_conv_is_the_svd_chain(variant):
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((12, 3)) @ rng.standard_normal((3, 8))).reshape(12, 8, 1, 1)
    geo = geometry(w.shape)
    chain = cp.decompose(w, geo, {"rank": 3}, spectra=cp.weight_spectra(w, geo), variant=variant)
    assert chain.method == "svd"
    assert rel_error(w, 1, chain) < 1e-6


@pytest.mark.parametrize("kernel", [(3, 3), (5,), (2, 3, 2)], ids=str)
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("ranks", [(6, 4, 3), (12, 8, 2), (3, 8, 9)])
def test_tucker3_recovers_exact_spatial_tucker_weight(kernel, group, ranks):
    k = math.prod(kernel)
    ranks = (ranks[0], ranks[1], min(ranks[2], k))
    rng = np.random.default_rng(sum(ranks) + group)
    w = np.concatenate([spatial_tucker(rng, 12, 8, kernel, ranks) for _ in range(group)], axis=0)
    geo = geometry(w.shape, group)
    explicit = dict(zip(("out", "in", "spatial"), ranks))
    chain = tucker3.decompose(w, geo, explicit, spectra=tucker3.weight_spectra(w, geo))
    assert chain.method == "tucker3" and chain.ranks == explicit
    assert rel_error(w, group, chain) < 1e-5
    assert chain.rel_error < 1e-5


def test_tucker3_none_modes_are_not_truncated():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((12, 8, 3, 3))
    geo = geometry(w.shape)
    chain = tucker3.decompose(w, geo, {"out": None, "in": None, "spatial": None} | {"spatial": 9})
    assert [c.role for c in chain.convs] == ["spatial", "out"]
    assert rel_error(w, 1, chain) < 1e-6
    with pytest.raises(ValueError, match="at least one"):
        tucker3.decompose(w, geo, {"out": None, "in": None, "spatial": None})
    with pytest.raises(ValueError, match="spatial-mode rank 10"):
        tucker3.decompose(w, geo, {"out": None, "in": None, "spatial": 10})


def test_tucker3_truncation_error_is_the_hosvd_projection_error():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((16, 12, 3, 3))
    chain = tucker3.decompose(w, geometry(w.shape), {"out": 10, "in": 6, "spatial": 4})
    assert chain.rel_error == pytest.approx(rel_error(w, 1, chain), rel=1e-5)


def test_tucker3_hooi_does_not_increase_the_error():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((16, 12, 3, 3))
    geo = geometry(w.shape)
    ranks = {"out": 8, "in": 6, "spatial": 4}
    hosvd = tucker3.decompose(w, geo, ranks)
    hooi = tucker3.decompose(w, geo, ranks, hooi_iters=10)
    assert hooi.rel_error <= hosvd.rel_error + 1e-9
    assert hooi.rel_error == pytest.approx(rel_error(w, 1, hooi), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Chain shapes, roles and group attributes


def summary(chain: ChainSpec):
    return [(c.role, c.weight.shape, c.group, c.carries_geometry, c.takes_bias, c.axis) for c in chain.convs]


def test_cp3_chain_shapes_grouped():
    w = exact_cp3(np.random.default_rng(0), 6, 4, (3, 3), 5, group=2)  # (12, 4, 3, 3), group 2
    chain = cp.decompose(w, geometry(w.shape, 2), {"rank": 5})
    assert summary(chain) == [
        ("in", (10, 4, 1, 1), 2, False, False, None),
        ("depthwise", (10, 1, 3, 3), 10, True, False, None),
        ("out", (12, 5, 1, 1), 2, False, True, None),
    ]
    assert chain.convs[0].at_input_resolution and not chain.convs[2].at_input_resolution
    assert chain.params == 10 * 4 + 10 * 9 + 12 * 5


@pytest.mark.parametrize("kernel", [(3, 5), (3, 2, 3)], ids=str)
def test_cp4_chain_has_one_depthwise_conv_per_axis(kernel):
    w = exact_cp4(np.random.default_rng(0), 6, 4, kernel, 3, group=2)
    chain = cp.decompose(w, geometry(w.shape, 2), {"rank": 3}, variant="cp4")
    nd = len(kernel)
    ones = (1,) * nd
    axis_convs = [
        (f"axis{j}", (6, 1, *(kernel[a] if a == j else 1 for a in range(nd))), 6, False, False, j) for j in range(nd)
    ]
    assert summary(chain) == [
        ("in", (6, 4, *ones), 2, False, False, None), *axis_convs, ("out", (12, 3, *ones), 2, False, True, None)
    ]


def test_cp4_in_1d_is_cp3():
    w = exact_cp3(np.random.default_rng(1), 8, 6, (5,), 4)
    geo = geometry(w.shape, pads=[2, 2])
    c3, c4 = cp.decompose(w, geo, {"rank": 4}), cp.decompose(w, geo, {"rank": 4}, variant="cp4")
    assert summary(c3) == summary(c4)
    for a, b in zip(c3.convs, c4.convs):
        np.testing.assert_array_equal(a.weight, b.weight)


def test_cp4_kernel_one_axis_without_geometry_is_dropped():
    w = exact_cp4(np.random.default_rng(2), 8, 6, (1, 3), 4)
    chain = cp.decompose(w, geometry(w.shape, pads=[0, 1, 0, 1]), {"rank": 4}, variant="cp4")
    assert [(c.role, c.weight.shape[2:], c.carries_geometry, c.axis) for c in chain.convs] == [
        ("in", (1, 1), False, None), ("depthwise", (1, 3), True, None), ("out", (1, 1), False, None)
    ]


def test_cp4_kernel_one_axis_with_a_stride_keeps_an_identity_conv():
    w = exact_cp4(np.random.default_rng(3), 8, 6, (1, 3), 4)
    chain = cp.decompose(w, geometry(w.shape, strides=[2, 1], pads=[0, 1, 0, 1]), {"rank": 4}, variant="cp4")
    assert [(c.role, c.weight.shape[2:], c.axis) for c in chain.convs] == [
        ("in", (1, 1), None), ("axis0", (1, 1), 0), ("axis1", (1, 3), 1), ("out", (1, 1), None)
    ]
    np.testing.assert_array_equal(chain.convs[1].weight, np.ones((4, 1, 1, 1), np.float32))
    assert rel_error(w, 1, chain) < 1e-5


@pytest.mark.parametrize("ranks,split", [((3, 3, 2), True), ((4, 3, 2), False), ((None, 3, 2), False)])
def test_tucker3_chain_shapes(ranks, split):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 8, 3, 3))  # group 2: 12 x 8 per group
    explicit = dict(zip(("out", "in", "spatial"), ranks))
    chain = tucker3.decompose(w, geometry(w.shape, 2), explicit)
    r_out, r_in, r_s = ranks
    expected = [
        ("in", (2 * r_in, 8, 1, 1), 2, False, False, None),
        ("spatial", (2 * r_in * r_s, 1, 3, 3), 2 * r_in, True, False, None),
    ]
    if split:  # r_out (r_in r_s + o) = 3 * 18 < o r_in r_s = 72 (4 * 18 = 72 is not cheaper)
        expected += [
            ("core", (2 * r_out, r_in * r_s, 1, 1), 2, False, False, None),
            ("out", (24, r_out, 1, 1), 2, False, True, None),
        ]
    else:
        expected += [("out", (24, r_in * r_s, 1, 1), 2, False, True, None)]
    assert summary(chain) == expected


def test_method_registry_exposes_a_uniform_interface():
    assert set(METHODS) == {"tucker2", "cp3", "cp4", "tucker3"}
    rng = np.random.default_rng(0)
    w = exact_cp3(rng, 12, 8, (3, 3), 4)
    geo = geometry(w.shape)
    for name, method in METHODS.items():
        spectra = method.weight_spectra(w, geo, in_mode=True)
        choice = method.choose_ranks(spectra, RankConfig(policy="ratio", ratio=0.5), None)
        chain = method.decompose(w, geo, choice.ranks, spectra=spectra, hooi_iters=0)
        assert chain.method == name
        assert chain.rel_error is not None


# ------------------------------------------------------------------------------------------------
# Ranks


def test_cp_rank_is_the_max_of_the_three_unfoldings_vbmf_ranks():
    rng = np.random.default_rng(0)
    w = add_noise(rng, spatial_tucker(rng, 24, 16, (3, 3), (6, 4, 3)))
    geo = geometry(w.shape)
    choice = cp.choose_ranks(cp.weight_spectra(w, geo), RankConfig())
    assert choice.ranks == {"rank": 6}
    (mode,) = choice.modes
    assert mode.mode == "rank" and mode.vbmf_rank == 6 and mode.full_rank == 24
    assert "out 6, in 4, spatial 3" in mode.note
    t3 = tucker3.choose_ranks(tucker3.weight_spectra(w, geo), RankConfig())
    assert t3.ranks == {"out": 6, "in": 4, "spatial": 3}


def test_cp_rank_of_a_grouped_conv_is_the_max_over_groups():
    rng = np.random.default_rng(1)
    w = np.concatenate([add_noise(rng, spatial_tucker(rng, 12, 16, (3, 3), r)) for r in ((6, 4, 3), (4, 7, 2))], axis=0)
    choice = cp.choose_ranks(cp.weight_spectra(w, geometry(w.shape, 2)), RankConfig())
    assert choice.ranks == {"rank": 7}
    assert "out 6, in 7, spatial 3" in choice.modes[0].note


def test_few_input_channels_use_only_the_output_unfolding():
    rng = np.random.default_rng(2)
    # output-mode rank 5, spatial-mode rank 6 (the 3 input channels are all signal: VBMF rank ~0)
    w = add_noise(rng, spatial_tucker(rng, 16, 3, (3, 3), (5, 3, 6)))
    geo = geometry(w.shape)
    assert cp.choose_ranks(cp.weight_spectra(w, geo, in_mode=True), RankConfig()).ranks == {"rank": 6}
    spectra = cp.weight_spectra(w, geo, in_mode=False)
    assert spectra.in_ is None and spectra.spatial is None
    choice = cp.choose_ranks(spectra, RankConfig())
    assert choice.ranks == {"rank": 5} and "out 5" in choice.modes[0].note and "in" not in choice.modes[0].note
    # the fit still works without the input/spatial spectra
    assert cp.decompose(w, geo, choice.ranks, spectra=spectra).rel_error < 0.5


@pytest.mark.parametrize(
    "config,expected",
    [
        (RankConfig(policy="ratio", ratio=0.5), 12),                   # ceil(0.5 * 24), R_full = 24
        (RankConfig(policy="weakened", weaken=0.6), 14),               # ceil(24 - 0.6 (24 - 6)) = ceil(13.2)
        (RankConfig(policy="weakened", weaken=0.0), 24),
        (RankConfig(policy="vbmf", round_to=4), 8),
        (RankConfig(policy="ratio", ratio=1.0, round_to=5), 24),       # rounded to 25, capped at R_full
    ],
)
def test_cp_rank_policies_use_the_largest_full_rank(config, expected):
    rng = np.random.default_rng(0)
    w = add_noise(rng, spatial_tucker(rng, 24, 16, (3, 3), (6, 4, 3)))
    assert cp.choose_ranks(cp.weight_spectra(w, geometry(w.shape)), config).ranks == {"rank": expected}


def test_cp_energy_rank_is_the_max_over_unfoldings():
    rng = np.random.default_rng(0)
    w = add_noise(rng, spatial_tucker(rng, 24, 16, (3, 3), (6, 4, 3)))
    spectra = cp.weight_spectra(w, geometry(w.shape))
    config = RankConfig(policy="energy", energy=0.999)
    per_mode = [policies._energy_rank(s, 0.999) for s in (spectra.out, spectra.in_, spectra.spatial)]
    assert cp.choose_ranks(spectra, config).ranks == {"rank": max(per_mode)}
    assert max(per_mode) == 6


def test_cp_rank0_rules_and_explicit_rank():
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((24, 16, 3, 3))
    spectra = cp.weight_spectra(noise, geometry(noise.shape))
    keep = cp.choose_ranks(spectra, RankConfig())
    assert keep.ranks == {"rank": None} and "layer kept" in keep.modes[0].note
    assert cp.choose_ranks(spectra, RankConfig(rank0="min", min_rank=3)).ranks == {"rank": 3}
    explicit = cp.choose_ranks(spectra, RankConfig(policy="file"), {"rank": 40, "in": None})
    assert explicit.ranks == {"rank": 40} and explicit.modes[0].note == "explicit (rank file)"
    assert cp.choose_ranks(spectra, RankConfig(policy="file"), None).ranks == {"rank": None}


def test_cp_rank_of_a_pointwise_conv_is_the_svd_rank():
    rng = np.random.default_rng(4)
    w = add_noise(rng, (rng.standard_normal((16, 5)) @ rng.standard_normal((5, 12))).reshape(16, 12, 1, 1))
    geo = geometry(w.shape)
    assert cp.choose_ranks(cp.weight_spectra(w, geo), RankConfig()).ranks == {"rank": 5}


def test_tucker2_choose_ranks_is_the_policy():
    rng = np.random.default_rng(5)
    w = add_noise(rng, spatial_tucker(rng, 24, 16, (3, 3), (6, 4, 9)))
    spectra = tucker2.weight_spectra(w, geometry(w.shape))
    expected = policies.choose_ranks(spectra, RankConfig()).ranks
    assert tucker2.choose_ranks(spectra, RankConfig()).ranks == expected == {"out": 6, "in": 4}


def test_rank_file_entries_per_method(tmp_path):
    path = tmp_path / "ranks.json"
    path.write_text(json.dumps({"a": {"rank": 300}, "b": 7, "c": None}))
    known = {"a": (False, 16, 8), "b": (False, 16, 8), "c": (False, 16, 8)}
    assert policies.load_rank_file(path, known, method="cp4") == {"a": {"rank": 300}, "b": {"rank": 7}, "c": {"rank": None}}
    with pytest.raises(UsageError, match="tucker2|out"):
        policies.load_rank_file(path, known)
    path.write_text(json.dumps({"a": [4, 3, 2], "b": {"out": None, "in": 8, "spatial": 5}}))
    assert policies.load_rank_file(path, known, method="tucker3") == {
        "a": {"out": 4, "in": 3, "spatial": 2}, "b": {"out": None, "in": 8, "spatial": 5}
    }
    path.write_text(json.dumps({"a": {"rank": 0}}))
    with pytest.raises(UsageError, match=">= 1"):
        policies.load_rank_file(path, known, method="cp3")


# ------------------------------------------------------------------------------------------------
# Degeneracy


def border_rank_weight(cos: float = 0.5) -> np.ndarray:
    """``a o a o b + a o b o a + b o a o a``: rank 3, border rank 2 (no best rank-2 CP exists:
    rank-2 fits get arbitrarily close only with two diverging, cancelling components)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal(4)
    a /= np.linalg.norm(a)
    b = rng.standard_normal(4)
    b -= (b @ a) * a
    b = cos * a + math.sqrt(1 - cos**2) * b / np.linalg.norm(b)
    t = np.einsum("i,j,k->ijk", a, a, b) + np.einsum("i,j,k->ijk", a, b, a) + np.einsum("i,j,k->ijk", b, a, a)
    return t.reshape(4, 4, 2, 2)


def test_degenerate_fit_is_detected_and_raised():
    w = border_rank_weight()
    with pytest.raises(cp.DegenerateFit) as info:
        cp.decompose(w, geometry(w.shape), {"rank": 2}, n_iter_max=1000)
    reason = info.value.reason
    assert "SVD init" in reason and "random init" in reason and "nearly cancel" in reason
    assert str(info.value) == reason


def test_border_rank_weight_at_its_rank_is_not_degenerate():
    w = border_rank_weight()
    chain = cp.decompose(w, geometry(w.shape), {"rank": 3})
    assert chain.rel_error < 1e-5


def test_degeneracy_reason_checks():
    rng = np.random.default_rng(0)
    unit = [f / np.linalg.norm(f, axis=0) for f in (rng.standard_normal((5, 3)) for _ in range(3))]
    assert cp.degeneracy_reason(np.array([1.0, 0.5, 0.2]), unit, 1.0) is None
    assert "non-finite" in cp.degeneracy_reason(np.array([np.nan, 1.0, 1.0]), unit, 1.0)
    assert "norm 12 x ||W||" in cp.degeneracy_reason(np.array([12.0, 1.0, 1.0]), unit, 1.0)
    # components 0 and 1 opposite on one mode: congruence -1
    opposite = [u.copy() for u in unit]
    for u in opposite:
        u[:, 1] = u[:, 0]
    opposite[0][:, 1] *= -1
    assert "components 0 and 1 nearly cancel" in cp.degeneracy_reason(np.array([3.0, 3.0, 1.0]), opposite, 1.0)
    # the same pair smaller than ||W|| is harmless
    assert cp.degeneracy_reason(np.array([0.5, 0.5, 1.0]), opposite, 1.0) is None


# ------------------------------------------------------------------------------------------------
# Rank for a target error


def test_smallest_rank_for_error_finds_the_exact_rank():
    w = exact_cp3(np.random.default_rng(0), 12, 8, (3, 3), 5)
    geo = geometry(w.shape)
    assert cp.smallest_rank_for_error(w, geo, 1e-4) == 5
    # a generic (non-separable) rank-5 CP-3 weight has no low-rank CP-4
    assert cp.smallest_rank_for_error(w, geo, 1e-4, "cp4") is None
    w4 = exact_cp4(np.random.default_rng(0), 12, 8, (3, 3), 5)
    assert cp.smallest_rank_for_error(w4, geo, 1e-4, "cp4") == 5


def test_smallest_rank_for_error_on_pointwise_is_eckart_young():
    rng = np.random.default_rng(1)
    m = rng.standard_normal((12, 8))
    s = np.linalg.svd(m, compute_uv=False)
    w = m.reshape(12, 8, 1, 1)
    tail = lambda r: math.sqrt(float(np.sum(s[r:] ** 2) / np.sum(s**2)))  # noqa: E731
    target = (tail(3) + tail(4)) / 2
    assert cp.smallest_rank_for_error(w, geometry(w.shape), target) == 4


def test_smallest_rank_for_error_edge_cases():
    w = np.random.default_rng(2).standard_normal((4, 3, 2, 2))
    with pytest.raises(ValueError, match="target_rel_error"):
        cp.smallest_rank_for_error(w, geometry(w.shape), -0.1)
    assert cp.smallest_rank_for_error(np.zeros((4, 3, 2, 2)), geometry((4, 3, 2, 2)), 0.1) == 1


# ------------------------------------------------------------------------------------------------
# Per-axis convs: geometry attributes, composition, MACs


def spec(kernel, *, carries=False, axis=None, channels=4, group=4) -> ConvSpec:
    return ConvSpec("x", np.ones((channels, channels // group, *kernel), np.float32), group, carries, False, False, axis)


ATTRS_2D = {"kernel_shape": [3, 5], "group": 1, "strides": [2, 3], "pads": [0, 1, 2, 3], "dilations": [1, 2]}


def test_geometry_attrs_pointwise_and_geometry_conv():
    assert geometry_attrs(spec((1, 1), group=1), ATTRS_2D) == {}
    assert geometry_attrs(spec((3, 5), carries=True), ATTRS_2D) == {"strides": [2, 3], "pads": [0, 1, 2, 3], "dilations": [1, 2]}
    same = {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [2, 2]}
    assert geometry_attrs(spec((3, 3), carries=True), same) == {"auto_pad": "SAME_UPPER", "strides": [2, 2]}


def test_geometry_attrs_per_axis_2d_asymmetric_pads():
    # ONNX pads = [begin_0, begin_1, end_0, end_1] = [0, 1, 2, 3]
    assert geometry_attrs(spec((3, 1), axis=0), ATTRS_2D) == {"strides": [2, 1], "dilations": [1, 1], "pads": [0, 0, 2, 0]}
    assert geometry_attrs(spec((1, 5), axis=1), ATTRS_2D) == {"strides": [1, 3], "dilations": [1, 2], "pads": [0, 1, 0, 3]}


def test_geometry_attrs_per_axis_3d():
    attrs = {"strides": [1, 2, 3], "pads": [1, 2, 3, 4, 5, 6], "dilations": [2, 1, 3]}
    got = [geometry_attrs(spec(tuple(3 if a == j else 1 for a in range(3)), axis=j), attrs) for j in range(3)]
    assert got == [
        {"strides": [1, 1, 1], "dilations": [2, 1, 1], "pads": [1, 0, 0, 4, 0, 0]},
        {"strides": [1, 2, 1], "dilations": [1, 1, 1], "pads": [0, 2, 0, 0, 5, 0]},
        {"strides": [1, 1, 3], "dilations": [1, 1, 3], "pads": [0, 0, 3, 0, 0, 6]},
    ]


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID", b"SAME_LOWER"])
def test_geometry_attrs_per_axis_auto_pad(auto_pad):
    attrs = {"auto_pad": auto_pad, "strides": [2, 1]}
    name = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    assert geometry_attrs(spec((3, 1), axis=0), attrs) == {"auto_pad": name, "strides": [2, 1]}
    assert geometry_attrs(spec((1, 3), axis=1), attrs) == {"auto_pad": name, "strides": [1, 1]}


def test_geometry_attrs_per_axis_missing_attributes_stay_missing():
    assert geometry_attrs(spec((3, 1), axis=0), {"kernel_shape": [3, 3]}) == {}
    assert geometry_attrs(spec((1, 3), axis=1), {"auto_pad": "NOTSET", "pads": [1, 1, 1, 1]}) == {
        "auto_pad": "NOTSET", "pads": [0, 1, 0, 1]
    }


def test_geometry_attrs_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="pads"):
        geometry_attrs(spec((3, 1), axis=0), {"pads": [1, 1]})
    with pytest.raises(ValueError, match="strides"):
        geometry_attrs(spec((3, 1), axis=0), {"strides": [1, 1, 1]})


def test_convspec_axis_validation():
    with pytest.raises(ValueError, match="exclusive"):
        spec((3, 1), carries=True, axis=0)
    with pytest.raises(ValueError, match="kernel 1 off axis"):
        spec((3, 3), axis=0)
    with pytest.raises(ValueError, match="2 spatial dims"):
        spec((3, 1), axis=2)
    assert spec((1, 1), group=1).axis is None  # the default leaves existing specs unchanged


def test_reconstruct_composes_per_axis_convs_into_the_outer_product_kernel():
    rng = np.random.default_rng(0)
    r, o, i = 3, 5, 4
    first = rng.standard_normal((r, i, 1, 1))
    col, row = rng.standard_normal((r, 1, 3, 1)), rng.standard_normal((r, 1, 1, 2))
    last = rng.standard_normal((o, r, 1, 1))
    chain = ChainSpec("cp4", {"rank": r}, (
        ConvSpec("in", first, 1, False, False, True),
        ConvSpec("axis0", col, r, False, False, False, axis=0),
        ConvSpec("axis1", row, r, False, False, False, axis=1),
        ConvSpec("out", last, 1, False, True, False),
    ))
    expected = np.einsum("or,ri,rx,ry->oixy", last[:, :, 0, 0], first[:, :, 0, 0], col[:, 0, :, 0], row[:, 0, 0, :])
    np.testing.assert_allclose(chain.reconstruct(), expected, rtol=1e-12)


def test_per_axis_macs_interpolate_between_input_and_output_resolution():
    conv0, conv1 = spec((3, 1), axis=0), spec((1, 3), axis=1)
    # 32 x 32 -> 16 x 16: axis 0 first gives 16 x 32
    assert conv0.macs(1024, 256) == conv0.weight.size * 512
    assert conv1.macs(1024, 256) == conv1.weight.size * 256
    assert spec((3, 3), carries=True).macs(1024, 256) == 36 * 256


# ------------------------------------------------------------------------------------------------
# tensorly adapter


def test_parafac_adapter_returns_weights_and_factors():
    rng = np.random.default_rng(0)
    t = np.einsum("ir,jr,kr->ijk", *(rng.standard_normal((n, 2)) for n in (4, 3, 5)))
    lam, factors = _tensorly.parafac(t, 2, n_iter_max=200, tol=1e-12)
    assert lam.shape == (2,) and [f.shape for f in factors] == [(4, 2), (3, 2), (5, 2)]
    assert np.linalg.norm(cp.cp_to_dense(lam, factors) - t) / np.linalg.norm(t) < 1e-6
    lam2, factors2 = _tensorly.parafac(t, 2, init=(lam, factors), n_iter_max=2, tol=0)
    assert np.linalg.norm(cp.cp_to_dense(lam2, factors2) - t) / np.linalg.norm(t) < 1e-6
