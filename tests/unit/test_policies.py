"""Rank policies (onnxfactor.ranks.policies): choose_ranks on weights of known multilinear rank,
the weakened / ratio / energy formulas, the rank-0, rounding and full-size rules, and rank files."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from onnxfactor.config import RankConfig
from onnxfactor.errors import UsageError
from onnxfactor.methods.base import ConvGeometry
from onnxfactor.methods.tucker2 import weight_spectra
from onnxfactor.ranks.policies import choose_ranks, load_rank_file
from onnxfactor.ranks.vbmf import evbmf_from_singular_values
from onnxfactor.spectral import unfold

NOISE = 1e-3  # ||noise|| / ||signal||


# ------------------------------------------------------------------------------------------------
# Weights of known rank


def orthonormal(rng: np.random.Generator, n: int, r: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return q


def add_noise(rng: np.random.Generator, w: np.ndarray, rel: float = NOISE) -> np.ndarray:
    """``w`` plus i.i.d. Gaussian noise whose Frobenius norm is ``rel * ||w||``."""
    sigma = rel * np.linalg.norm(w) / math.sqrt(w.size)
    return w + sigma * rng.standard_normal(w.shape)


def multilinear(rng: np.random.Generator, o: int, i: int, kernel, r_out: int, r_in: int) -> np.ndarray:
    """``core x_0 U x_1 V`` of multilinear rank ``(r_out, r_in)`` on the channel modes, noise-free."""
    core = rng.standard_normal((r_out, r_in, *kernel))
    return np.einsum("rs...,or,is->oi...", core, orthonormal(rng, o, r_out), orthonormal(rng, i, r_in))


def grouped_multilinear(rng, o: int, i: int, kernel, group_ranks) -> np.ndarray:
    """A grouped weight ``(g*o, i, *k)`` whose group ``g`` has its own ranks ``group_ranks[g]``."""
    return np.concatenate([multilinear(rng, o, i, kernel, ro, ri) for ro, ri in group_ranks], axis=0)


def low_rank_pointwise(rng, o: int, i: int, rank: int) -> np.ndarray:
    """A ``(o, i, 1, 1)`` pointwise weight of matrix rank ``rank``, noise-free."""
    return (rng.standard_normal((o, rank)) @ rng.standard_normal((rank, i))).reshape(o, i, 1, 1)


def geometry(weight: np.ndarray, group: int = 1) -> ConvGeometry:
    return ConvGeometry.from_attrs({"group": group}, weight.shape)


def choose(weight: np.ndarray, config: RankConfig, group: int = 1, explicit=None):
    return choose_ranks(weight_spectra(weight, geometry(weight, group)), config, explicit)


def exact_ceil(x: Fraction) -> int:
    return math.ceil(x)


# (id, weight shape, (r_out, r_in))
KNOWN = [
    ("64x32k3", (64, 32, 3, 3), (12, 7)),
    ("128x64k3", (128, 64, 3, 3), (20, 10)),
    ("conv1d_48x24k5", (48, 24, 5), (8, 5)),
    ("conv3d_32x16k3", (32, 16, 3, 3, 3), (6, 4)),
]


def known_weight(shape, ranks, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return add_noise(rng, multilinear(rng, shape[0], shape[1], shape[2:], *ranks)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# vbmf


@pytest.mark.parametrize("shape, ranks", [c[1:] for c in KNOWN], ids=[c[0] for c in KNOWN])
@pytest.mark.parametrize("seed", [0, 1])
def test_vbmf_recovers_multilinear_rank(shape, ranks, seed):
    weight = known_weight(shape, ranks, seed)
    choice = choose(weight, RankConfig(policy="vbmf"))
    assert choice.ranks == {"out": ranks[0], "in": ranks[1]}
    assert choice.decomposes
    out, in_ = choice.modes
    k = math.prod(shape[2:])
    assert (out.mode, out.size, out.full_rank, out.vbmf_rank) == ("out", shape[0], min(shape[0], shape[1] * k), ranks[0])
    assert (in_.mode, in_.size, in_.full_rank, in_.vbmf_rank) == ("in", shape[1], min(shape[1], shape[0] * k), ranks[1])
    assert out.note == in_.note == "vbmf"
    # sigma2 estimates the noise variance of the unfolding's entries (the added noise, 1e-3 relative)
    sigma2 = (NOISE * np.linalg.norm(weight) / math.sqrt(weight.size)) ** 2
    assert 0.5 < out.sigma2 / sigma2 < 2.0


def test_vbmf_out_mode_only_when_input_mode_not_considered():
    weight = known_weight((64, 32, 3, 3), (12, 7), seed=3)
    spectra = weight_spectra(weight, geometry(weight), in_mode=False)
    choice = choose_ranks(spectra, RankConfig(policy="vbmf"))
    assert choice.ranks == {"out": 12, "in": None}
    assert [m.mode for m in choice.modes] == ["out"]


# (group, per-group weight shape (o, i, *k), per-group (r_out, r_in))
GROUPED = [
    (2, (32, 16, 3, 3), [(5, 7), (9, 4)]),
    (4, (16, 12, 3, 3), [(5, 2), (9, 6), (3, 3), (7, 5)]),
    (2, (24, 16, 5), [(9, 3), (5, 8)]),
]


@pytest.mark.parametrize("group, group_shape, group_ranks", GROUPED, ids=["g2", "g4", "g2_conv1d"])
def test_grouped_common_rank_is_max_over_groups_per_mode(group, group_shape, group_ranks):
    rng = np.random.default_rng(10 + group)
    o, i, *kernel = group_shape
    weight = add_noise(rng, grouped_multilinear(rng, o, i, kernel, group_ranks)).astype(np.float32)
    assert weight.shape == (group * o, i, *kernel)
    spectra = weight_spectra(weight, geometry(weight, group))
    # each group alone is recovered exactly, so the common rank is a true maximum
    per_group_out = [evbmf_from_singular_values(s.singular_values, s.shape).rank for s in spectra.out]
    per_group_in = [evbmf_from_singular_values(s.singular_values, s.shape).rank for s in spectra.in_]
    assert per_group_out == [r[0] for r in group_ranks]
    assert per_group_in == [r[1] for r in group_ranks]

    choice = choose_ranks(spectra, RankConfig(policy="vbmf"))
    expected = {"out": max(r[0] for r in group_ranks), "in": max(r[1] for r in group_ranks)}
    assert choice.ranks == expected
    assert [m.size for m in choice.modes] == [o, i]  # per-group mode sizes


# (id, o, i, rank)
POINTWISE = [("64x32", 64, 32, 6), ("tall_64x16", 64, 16, 6), ("wide_16x64", 16, 64, 6), ("square_32", 32, 32, 4)]


@pytest.mark.parametrize("o, i, rank", [c[1:] for c in POINTWISE], ids=[c[0] for c in POINTWISE])
def test_vbmf_pointwise_matrix_rank(o, i, rank):
    rng = np.random.default_rng(o * 100 + i)
    weight = add_noise(rng, low_rank_pointwise(rng, o, i, rank)).astype(np.float32)
    choice = choose(weight, RankConfig(policy="vbmf"))
    assert choice.ranks == {"rank": rank}
    (mode,) = choice.modes
    assert (mode.mode, mode.size, mode.full_rank, mode.vbmf_rank) == ("rank", min(o, i), min(o, i), rank)


def test_vbmf_grouped_pointwise_takes_max_over_groups():
    rng = np.random.default_rng(5)
    weight = np.concatenate([low_rank_pointwise(rng, 32, 16, r) for r in (3, 8)], axis=0)
    weight = add_noise(rng, weight).astype(np.float32)
    assert choose(weight, RankConfig(policy="vbmf"), group=2).ranks == {"rank": 8}


# ------------------------------------------------------------------------------------------------
# Rank 0 (pure noise)


@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (48, 24, 5)], ids=["k3", "conv1d"])
@pytest.mark.parametrize("seed", [0, 1])
def test_pure_noise_rank0_keep_leaves_layer_unchanged(shape, seed):
    weight = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    choice = choose(weight, RankConfig(policy="vbmf", rank0="keep"))
    assert choice.ranks == {"out": None, "in": None}
    assert not choice.decomposes
    for mode in choice.modes:
        assert mode.vbmf_rank == 0
        assert mode.rank is None
        assert "rank 0" in mode.note and "kept" in mode.note


@pytest.mark.parametrize("seed", [0, 1])
def test_pure_noise_rank0_min_uses_min_rank(seed):
    weight = np.random.default_rng(seed).standard_normal((64, 32, 3, 3)).astype(np.float32)
    choice = choose(weight, RankConfig(policy="vbmf", rank0="min", min_rank=3))
    assert choice.ranks == {"out": 3, "in": 3}
    assert choice.decomposes
    assert all(m.vbmf_rank == 0 and "rank 0" in m.note and "min rank 3" in m.note for m in choice.modes)


def test_pure_noise_pointwise_rank0():
    weight = np.random.default_rng(2).standard_normal((64, 32, 1, 1)).astype(np.float32)
    assert choose(weight, RankConfig(policy="vbmf")).ranks == {"rank": None}
    assert choose(weight, RankConfig(policy="vbmf", rank0="min", min_rank=3)).ranks == {"rank": 3}
    # min rank, then rounding
    assert choose(weight, RankConfig(policy="vbmf", rank0="min", min_rank=3, round_to=8)).ranks == {"rank": 8}


# ------------------------------------------------------------------------------------------------
# weakened: r = ceil(R - w (R - r_vbmf)), R = min(L, M) of the unfolding


# (id, weight shape, known (r_out, r_in))
WEAKENED = [
    ("64x32k3", (64, 32, 3, 3), (12, 7)),            # R = mode size on both modes
    ("first_conv_64x3k3", (64, 3, 3, 3), (10, 3)),   # out-mode unfolding 64 x 27: R = 27 < 64
    ("96x48k3", (96, 48, 3, 3), (6, 4)),             # R - r_vbmf = 90: 0.7 * 90 is 62.99999999999999 in floats
]


def weakened_expected(full_rank: int, vbmf_rank: int, size: int, w: float) -> int | None:
    r = exact_ceil(full_rank - Fraction(str(w)) * (full_rank - vbmf_rank))
    return None if r <= 0 or r >= size else r  # rank 0 with rank0="keep", or full size


@pytest.mark.parametrize("w", [0.0, 0.3, 0.6, 0.7, 1.0])
@pytest.mark.parametrize("shape, ranks", [c[1:] for c in WEAKENED], ids=[c[0] for c in WEAKENED])
def test_weakened_formula(shape, ranks, w):
    weight = known_weight(shape, ranks, seed=4)
    vbmf = choose(weight, RankConfig(policy="vbmf"))
    choice = choose(weight, RankConfig(policy="weakened", weaken=w))
    assert vbmf.modes[0].vbmf_rank == ranks[0]
    k = math.prod(shape[2:])
    full = {"out": min(shape[0], shape[1] * k), "in": min(shape[1], shape[0] * k)}
    for mode, vmode in zip(choice.modes, vbmf.modes):
        assert mode.full_rank == full[mode.mode]
        expected = weakened_expected(mode.full_rank, mode.vbmf_rank, mode.size, w)
        assert mode.rank == expected, (mode.mode, mode.note)
        if w == 1.0:
            assert mode.rank == vmode.rank  # plain VBMF
        if expected is None:
            assert "full size" in mode.note or "rank 0" in mode.note


def test_weakened_zero_keeps_full_rank():
    # w = 0 gives R: square modes (R = size) are dropped, the tall out-mode of a first conv is not
    square = choose(known_weight((64, 32, 3, 3), (12, 7), 4), RankConfig(policy="weakened", weaken=0.0))
    assert square.ranks == {"out": None, "in": None}
    assert not square.decomposes
    first = choose(known_weight((64, 3, 3, 3), (10, 3), 4), RankConfig(policy="weakened", weaken=0.0))
    assert first.ranks == {"out": 27, "in": None}
    assert first.modes[0].note == "weakened"


def test_weakened_hand_numbers():
    choice = choose(known_weight((64, 32, 3, 3), (12, 7), 4), RankConfig(policy="weakened", weaken=0.6))
    # out: ceil(64 - 0.6 * 52) = ceil(32.8) = 33; in: ceil(32 - 0.6 * 25) = 17
    assert choice.ranks == {"out": 33, "in": 17}
    choice = choose(known_weight((96, 48, 3, 3), (6, 4), 4), RankConfig(policy="weakened", weaken=0.7))
    # out: 96 - 0.7 * 90 = 33 exactly (the float product 62.99999999999999 must not bump it to 34);
    # in: ceil(48 - 0.7 * 44) = ceil(17.2) = 18
    assert choice.ranks == {"out": 33, "in": 18}


# ------------------------------------------------------------------------------------------------
# ratio and energy, against numpy SVD computed here


def unfolding_singular_values(weight: np.ndarray, group: int, mode: int) -> list[np.ndarray]:
    o = weight.shape[0] // group
    return [
        np.linalg.svd(unfold(weight[g * o : (g + 1) * o].astype(np.float64), mode), compute_uv=False)
        for g in range(group)
    ]


def pointwise_singular_values(weight: np.ndarray, group: int) -> list[np.ndarray]:
    o = weight.shape[0] // group
    return [
        np.linalg.svd(weight[g * o : (g + 1) * o].reshape(o, -1).astype(np.float64), compute_uv=False)
        for g in range(group)
    ]


def energy_rank_reference(singular_values: np.ndarray, energy: float) -> int:
    """Smallest r with sum_{h<=r} s_h^2 >= energy * sum s_h^2, by a plain loop."""
    s2 = singular_values**2
    total = s2.sum()
    acc = 0.0
    for r, v in enumerate(s2, start=1):
        acc += v
        if acc >= energy * total:
            share_before = (acc - v) / total
            # test data sanity: the decision is not within float32 rounding of the boundary
            assert share_before < energy - 1e-5 and acc / total > energy - 1e-12
            return r
    raise AssertionError("unreachable")


def spread_weight(shape, seed: int) -> np.ndarray:
    """A random weight with a decaying channel spectrum (so energy ranks are well inside the range)."""
    rng = np.random.default_rng(seed)
    o, i = shape[:2]
    w = rng.standard_normal(shape)
    w = np.einsum("oi...,o->oi...", w, 1.0 / (1.0 + 0.15 * np.arange(o)))
    return np.einsum("oi...,i->oi...", w, 1.0 / (1.0 + 0.1 * np.arange(i))).astype(np.float32)


# (id, weight shape, group)
SPECTRAL_CASES = [
    ("64x32k3", (64, 32, 3, 3), 1),
    ("50x25k3", (50, 25, 3, 3), 1),
    ("first_conv_64x3k3", (64, 3, 3, 3), 1),
    ("g2_64x16k3", (64, 16, 3, 3), 2),
    ("g4_conv1d", (32, 6, 5), 4),
    ("conv3d", (32, 16, 3, 3, 3), 1),
]


@pytest.mark.parametrize("ratio", [0.14, 0.28, 0.5, 0.55, 0.7])
@pytest.mark.parametrize("shape, group", [c[1:] for c in SPECTRAL_CASES], ids=[c[0] for c in SPECTRAL_CASES])
def test_ratio_policy(shape, group, ratio):
    weight = spread_weight(shape, seed=1)
    choice = choose(weight, RankConfig(policy="ratio", ratio=ratio), group=group)
    o, i, k = shape[0] // group, shape[1], math.prod(shape[2:])
    for mode, size, full in [(choice.modes[0], o, min(o, i * k)), (choice.modes[1], i, min(i, o * k))]:
        assert mode.full_rank == full
        r = exact_ceil(Fraction(str(ratio)) * full)
        assert mode.rank == (None if r >= size else r), (mode.mode, full)


@pytest.mark.parametrize("ratio", [0.14, 0.55])
@pytest.mark.parametrize("o, i", [(100, 200), (200, 100), (50, 64)])
def test_ratio_policy_pointwise(o, i, ratio):
    weight = spread_weight((o, i, 1, 1), seed=2)
    full = min(o, i)
    assert choose(weight, RankConfig(policy="ratio", ratio=ratio)).ranks == {
        "rank": exact_ceil(Fraction(str(ratio)) * full)
    }


@pytest.mark.parametrize("energy", [0.5, 0.8, 0.95])
@pytest.mark.parametrize("shape, group", [c[1:] for c in SPECTRAL_CASES], ids=[c[0] for c in SPECTRAL_CASES])
def test_energy_policy(shape, group, energy):
    weight = spread_weight(shape, seed=3)
    choice = choose(weight, RankConfig(policy="energy", energy=energy), group=group)
    for mode_index, mode in enumerate(choice.modes):
        r = max(energy_rank_reference(s, energy) for s in unfolding_singular_values(weight, group, mode_index))
        assert mode.rank == (None if r >= mode.size else r), (mode.mode, r)
        assert mode.note == ("energy" if r < mode.size else "energy: full size, mode kept")


@pytest.mark.parametrize("energy", [0.5, 0.9])
@pytest.mark.parametrize("o, i, group", [(64, 16, 1), (16, 64, 1), (64, 32, 2)])
def test_energy_policy_pointwise(o, i, group, energy):
    weight = spread_weight((o, i // group, 1, 1), seed=4)
    r = max(energy_rank_reference(s, energy) for s in pointwise_singular_values(weight, group))
    assert choose(weight, RankConfig(policy="energy", energy=energy), group=group).ranks == {"rank": r}


def test_energy_hand_example():
    # channel spectrum s = (4, 2, 1, 0.5) on a 4 x 36 unfolding: cumulative shares of s^2 (total 21.25)
    # are 0.753, 0.941, 0.988, 1.0
    rng = np.random.default_rng(6)
    u = orthonormal(rng, 4, 4)
    v = orthonormal(rng, 36, 4)
    mat = (u * np.array([4.0, 2.0, 1.0, 0.5])) @ v.T
    weight = mat.reshape(4, 4, 3, 3).astype(np.float32)
    spectra = weight_spectra(weight, geometry(weight), in_mode=False)
    ranks = {e: choose_ranks(spectra, RankConfig(policy="energy", energy=e)).ranks["out"] for e in (0.7, 0.75, 0.9, 0.95)}
    assert ranks == {0.7: 1, 0.75: 1, 0.9: 2, 0.95: 3}


# ------------------------------------------------------------------------------------------------
# round_to and the full-size rule


def test_round_to_rounds_up():
    weight = known_weight((64, 32, 3, 3), (12, 7), seed=0)
    choice = choose(weight, RankConfig(policy="vbmf", round_to=8))
    assert choice.ranks == {"out": 16, "in": 8}
    assert all("rounded to x8" in m.note for m in choice.modes)
    # a multiple stays as it is
    weight = known_weight((64, 32, 3, 3), (16, 8), seed=0)
    assert choose(weight, RankConfig(policy="vbmf", round_to=8)).ranks == {"out": 16, "in": 8}


def test_round_to_full_size_drops_mode():
    weight = known_weight((32, 16, 3, 3), (12, 7), seed=1)
    choice = choose(weight, RankConfig(policy="vbmf", round_to=16))
    assert choice.ranks == {"out": 16, "in": None}
    assert choice.modes[1].size == 16
    assert "rounded to x16" in choice.modes[1].note and "full size" in choice.modes[1].note


@pytest.mark.parametrize("round_to", [2, 8, 16, 32, 64])
@pytest.mark.parametrize("shape, ranks", [((40, 20, 3, 3), (17, 13)), ((48, 24, 5), (8, 5)), ((64, 32, 3, 3), (12, 7))])
def test_rounding_never_exceeds_mode_size(shape, ranks, round_to):
    weight = known_weight(shape, ranks, seed=2)
    choice = choose(weight, RankConfig(policy="vbmf", round_to=round_to))
    for mode, r in zip(choice.modes, ranks):
        rounded = math.ceil(r / round_to) * round_to
        assert mode.rank == (rounded if rounded < mode.size else None)
        assert mode.rank is None or (mode.rank % round_to == 0 and mode.rank < mode.size)


@pytest.mark.parametrize(
    "config",
    [RankConfig(policy="ratio", ratio=1.0), RankConfig(policy="vbmf", rank0="min", min_rank=16)],
    ids=["ratio1", "min_rank_16"],
)
def test_rank_at_full_size_is_dropped(config):
    # a pointwise 16 x 64 noise weight: any rule that lands on 16 = size gains nothing.
    # (VBMF itself never returns the full size: its largest rank is ceil(L / (1 + L/M)) - 1.)
    weight = np.random.default_rng(8).standard_normal((16, 64, 1, 1)).astype(np.float32)
    choice = choose(weight, config)
    assert choice.ranks == {"rank": None}
    assert not choice.decomposes
    assert choice.modes[0].note.endswith(": full size, mode kept")


def test_mode_choice_to_dict():
    choice = choose(known_weight((64, 32, 3, 3), (12, 7), seed=0), RankConfig())
    d = choice.modes[0].to_dict()
    assert {k: d[k] for k in ("mode", "size", "full_rank", "vbmf_rank", "rank", "note")} == {
        "mode": "out", "size": 64, "full_rank": 64, "vbmf_rank": 12, "rank": 12, "note": "vbmf"
    }
    assert d["sigma2"] > 0


# ------------------------------------------------------------------------------------------------
# Rank files

KNOWN_NODES = {"conv_a": (False, 64, 32), "pw": (True, 64, 16), "conv_b": (False, 16, 8)}


def write(tmp_path, content):
    path = tmp_path / "ranks.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.parametrize(
    "content, expected",
    [
        ({"conv_a": {"out": 12, "in": 7}}, {"conv_a": {"out": 12, "in": 7}}),
        ({"conv_a": [12, 7]}, {"conv_a": {"out": 12, "in": 7}}),
        ({"conv_a": [64, 32]}, {"conv_a": {"out": 64, "in": 32}}),  # full size is allowed when explicit
        ({"conv_a": {"out": 12}}, {"conv_a": {"out": 12, "in": None}}),
        ({"conv_a": {"out": None, "in": 5}}, {"conv_a": {"out": None, "in": 5}}),
        ({"conv_a": [None, 5]}, {"conv_a": {"out": None, "in": 5}}),
        ({"conv_a": None}, {"conv_a": {"out": None, "in": None}}),
        ({"pw": 6}, {"pw": {"rank": 6}}),
        ({"pw": {"rank": 16}}, {"pw": {"rank": 16}}),
        ({"pw": None}, {"pw": {"rank": None}}),
        ({"pw": {"rank": None}}, {"pw": {"rank": None}}),
        ({}, {}),
        (
            {"conv_a": [3, 4], "pw": 2, "conv_b": {"out": 16, "in": 1}},
            {"conv_a": {"out": 3, "in": 4}, "pw": {"rank": 2}, "conv_b": {"out": 16, "in": 1}},
        ),
    ],
)
def test_load_rank_file_valid(tmp_path, content, expected):
    assert load_rank_file(write(tmp_path, content), KNOWN_NODES) == expected


@pytest.mark.parametrize(
    "content, node, fragments",
    [
        ("{", None, ["not valid JSON"]),
        ("", None, ["not valid JSON"]),
        (b"\xff\xfe{", None, ["not valid JSON"]),  # not UTF-8
        ("[[12, 7]]", None, ["JSON object", "list"]),
        ("null", None, ["JSON object"]),
        ({"conv_x": [1, 2]}, "conv_x", ["unknown Conv node", "conv_a"]),
        ({"conv_a": {"out": 0, "in": 3}}, "conv_a", ["out rank 0", "[1, 64]"]),
        ({"conv_a": [3, 0]}, "conv_a", ["in rank 0", "[1, 32]"]),
        ({"pw": 0}, "pw", ["rank 0", "[1, 16]"]),
        ({"conv_a": [65, 3]}, "conv_a", ["out rank 65", "[1, 64]"]),
        ({"conv_a": [3, 33]}, "conv_a", ["in rank 33", "[1, 32]"]),
        ({"pw": 17}, "pw", ["rank 17", "[1, 16]"]),
        ({"pw": {"rank": 17}}, "pw", ["rank 17", "[1, 16]"]),
        ({"conv_a": {"out": True, "in": 3}}, "conv_a", ["out rank True"]),
        ({"pw": True}, "pw", ["rank True"]),
        ({"conv_a": [2.5, 3]}, "conv_a", ["out rank 2.5"]),
        ({"conv_a": ["12", 3]}, "conv_a", ["out rank '12'"]),
        ({"conv_a": {"out": 3, "inp": 2}}, "conv_a", ["'inp'"]),
        ({"conv_a": {"rank": 3}}, "conv_a", ['"out": R_out']),
        ({"conv_a": [1, 2, 3]}, "conv_a", ["[R_out, R_in]"]),
        ({"conv_a": 5}, "conv_a", ['"out": R_out']),
        ({"pw": {"out": 3}}, "pw", ["pointwise", "'out'"]),
        ({"pw": [3, 4]}, "pw", ["rank [3, 4]"]),
    ],
)
def test_load_rank_file_errors(tmp_path, content, node, fragments):
    path = write(tmp_path, content)
    with pytest.raises(UsageError) as info:
        load_rank_file(path, KNOWN_NODES)
    message = str(info.value)
    assert str(path) in message
    if node is not None:
        assert repr(node) in message or node in message
    for fragment in fragments:
        assert fragment in message
    assert info.value.exit_code == 2


def test_load_rank_file_missing(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(UsageError, match="rank file not found") as info:
        load_rank_file(path, KNOWN_NODES)
    assert str(path) in str(info.value)
    with pytest.raises(UsageError, match="not found"):
        load_rank_file(tmp_path, KNOWN_NODES)  # a directory is not a rank file


# ------------------------------------------------------------------------------------------------
# policy "file"


@pytest.mark.parametrize(
    "explicit, expected",
    [
        ({"out": 64, "in": 32}, {"out": 64, "in": 32}),  # full size, taken as given
        ({"out": 5, "in": None}, {"out": 5, "in": None}),
        ({"out": None, "in": 31}, {"out": None, "in": 31}),
        ({"out": None, "in": None}, {"out": None, "in": None}),
        (None, {"out": None, "in": None}),  # node not in the file: unchanged
    ],
)
def test_file_policy_takes_explicit_ranks(explicit, expected):
    weight = known_weight((64, 32, 3, 3), (12, 7), seed=0)
    # round_to and rank0 rules do not apply to explicit ranks
    choice = choose(weight, RankConfig(policy="file", round_to=8, rank0="min", min_rank=3), explicit=explicit)
    assert choice.ranks == expected
    assert choice.decomposes == any(v is not None for v in expected.values())
    for mode in choice.modes:
        assert mode.note == ("explicit (rank file)" if mode.rank is not None else "not decomposed (rank file)")
        assert mode.vbmf_rank == {"out": 12, "in": 7}[mode.mode]  # still reported


def test_file_policy_pointwise_full_size():
    weight = low_rank_pointwise(np.random.default_rng(0), 64, 16, 6).astype(np.float32)
    assert choose(weight, RankConfig(policy="file"), explicit={"rank": 16}).ranks == {"rank": 16}
    assert choose(weight, RankConfig(policy="file"), explicit={"rank": 3}).ranks == {"rank": 3}
    assert choose(weight, RankConfig(policy="file"), explicit=None).ranks == {"rank": None}


def test_file_policy_round_trip(tmp_path):
    path = write(tmp_path, {"conv_a": [10, None], "pw": 4})
    entries = load_rank_file(path, KNOWN_NODES)
    weight = known_weight((64, 32, 3, 3), (12, 7), seed=0)
    assert choose(weight, RankConfig(policy="file", rank_file=path), explicit=entries["conv_a"]).ranks == {
        "out": 10,
        "in": None,
    }


def test_unknown_policy_is_a_usage_error():
    weight = known_weight((64, 32, 3, 3), (12, 7), seed=0)
    with pytest.raises(UsageError, match="unknown rank policy 'svd'"):
        choose(weight, RankConfig(policy="svd"))


# ------------------------------------------------------------------------------------------------
# per-node methods in a rank file (the search's mixed allocations)


def test_rank_file_entries_may_name_their_method(tmp_path):
    from onnxfactor.methods import METHODS
    from onnxfactor.ranks.policies import METHOD_NAMES

    assert METHOD_NAMES == tuple(METHODS)  # ranks/ keeps its own copy (no import of methods/)
    path = write(tmp_path, {"conv_a": {"method": "cp3", "rank": 40}, "conv_b": {"method": "tucker3", "out": 8, "in": 1, "spatial": 4},
                            "pw": {"method": "cp4", "rank": 3}, "conv_c": None})
    known = {**KNOWN_NODES, "conv_c": (False, 8, 8)}
    entries = load_rank_file(path, known)  # default method tucker2 for entries without one
    assert entries == {"conv_a": {"rank": 40}, "conv_b": {"out": 8, "in": 1, "spatial": 4}, "pw": {"rank": 3},
                       "conv_c": {"out": None, "in": None}}
    assert entries.methods == {"conv_a": "cp3", "conv_b": "tucker3", "pw": "cp4"}
    assert load_rank_file(path, known, method="auto").methods == entries.methods  # every decomposed entry names one


@pytest.mark.parametrize("content, method, fragments", [
    ({"conv_a": {"method": "svd2", "rank": 3}}, "tucker2", ["'conv_a'", "method 'svd2'", "tucker2, cp3, cp4, tucker3"]),
    ({"conv_a": [3, 4]}, "auto", ["'conv_a'", "must name its method", "--method auto"]),
    ({"conv_a": {"method": "tucker2"}}, "tucker2", ["'conv_a'", "no ranks"]),
    ({"conv_a": {"method": "cp3", "out": 3}}, "tucker2", ["'conv_a'", "{\"rank\": R} for cp3"]),
])
def test_rank_file_method_errors(tmp_path, content, method, fragments):
    path = write(tmp_path, content)
    with pytest.raises(UsageError) as info:
        load_rank_file(path, KNOWN_NODES, method=method)
    assert all(f in str(info.value) for f in fragments), str(info.value)
