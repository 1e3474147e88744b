"""Rank policies: turn the spectra of a weight's unfoldings into the ranks of its chain.

Policies (``RankConfig.policy``), applied to each decomposed mode of size ``n`` whose unfolding
has ``R = min(L, M)`` non-trivial singular values:

* ``vbmf``: the EVBMF rank of the unfolding (:mod:`onnxfactor.ranks.vbmf`).
* ``weakened``: ``r = ceil(R - w (R - r_vbmf))`` (Gusak et al., MUSCO, 2019); ``w = 1`` is VBMF,
  ``w = 0`` keeps ``R``.
* ``ratio``: ``ceil(ratio * R)``.
* ``energy``: the smallest ``r`` whose leading squared singular values hold ``energy`` of the total.
* ``file``: explicit ranks per node name (see :func:`load_rank_file`).

Grouped convs get one common rank: the maximum over the groups.

Rules applied after the policy (not to explicit ranks, which are taken as given):

* A VBMF rank of 0 means the unfolding is indistinguishable from noise. With ``rank0="keep"``
  (default) that mode is not decomposed; with ``rank0="min"`` it gets ``min_rank``.
* Ranks are rounded up to a multiple of ``round_to`` (capped at ``n``).
* A rank equal to the mode size ``n`` gains nothing (a square factor is pure overhead), so that
  mode is not decomposed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxfactor.config import RankConfig
from onnxfactor.errors import UsageError
from onnxfactor.methods.tucker2 import WeightSpectra
from onnxfactor.ranks.vbmf import evbmf_from_singular_values
from onnxfactor.spectral import ModeSpectrum


@dataclass(frozen=True)
class ModeChoice:
    """The rank decision for one mode of one layer (a row of the per-layer report)."""

    mode: str                   # "out", "in" or "rank" (pointwise SVD)
    size: int                   # mode size n per group
    full_rank: int              # R = min(L, M) of the unfolding
    vbmf_rank: int              # EVBMF rank (max over groups)
    sigma2: float               # EVBMF noise variance (mean over groups)
    rank: int | None            # chosen rank; None = mode not decomposed
    note: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RankChoice:
    """Ranks for one layer: ``ranks`` is what the method takes; ``modes`` explains them."""

    ranks: dict
    modes: list[ModeChoice] = field(default_factory=list)

    @property
    def decomposes(self) -> bool:
        return any(r is not None for r in self.ranks.values())


def _vbmf(spectra: tuple[ModeSpectrum, ...]) -> tuple[int, float]:
    results = [evbmf_from_singular_values(s.singular_values, s.shape) for s in spectra]
    return max(r.rank for r in results), float(np.mean([r.sigma2 for r in results]))


def _energy_rank(spectra: tuple[ModeSpectrum, ...], energy: float) -> int:
    ranks = []
    for s in spectra:
        e = np.cumsum(s.singular_values.astype(np.float64) ** 2)
        if e[-1] <= 0:
            ranks.append(0)
            continue
        ranks.append(int(np.searchsorted(e / e[-1], energy - 1e-12) + 1))
    return max(ranks)


def _ceil(x: float) -> int:
    """``ceil`` of a product that is meant to be exact: ``0.7 * 90`` is ``62.99999999999999`` in
    floats, and ``ceil(96 - 62.99999999999999)`` would give 34 instead of 33."""
    return math.ceil(round(x, 9))


def _policy_rank(config: RankConfig, spectra, full_rank: int, vbmf_rank: int) -> int:
    if config.policy == "vbmf":
        return vbmf_rank
    if config.policy == "weakened":
        return _ceil(full_rank - config.weaken * (full_rank - vbmf_rank))
    if config.policy == "ratio":
        return _ceil(config.ratio * full_rank)
    if config.policy == "energy":
        return _energy_rank(spectra, config.energy)
    raise UsageError(f"unknown rank policy {config.policy!r}; choose one of vbmf, weakened, ratio, energy, file")


def _mode_choice(mode: str, size: int, spectra, config: RankConfig, explicit) -> ModeChoice:
    full_rank = spectra[0].full_rank
    vbmf_rank, sigma2 = _vbmf(spectra)
    if explicit is not _UNSET:
        note = "explicit (rank file)" if explicit is not None else "not decomposed (rank file)"
        return ModeChoice(mode, size, full_rank, vbmf_rank, sigma2, explicit, note)
    rank = _policy_rank(config, spectra, full_rank, vbmf_rank)
    note = config.policy
    if rank <= 0:
        if config.rank0 == "keep":
            return ModeChoice(mode, size, full_rank, vbmf_rank, sigma2, None, "rank 0 (noise): mode kept")
        rank, note = config.min_rank, f"rank 0 (noise): min rank {config.min_rank}"
    if config.round_to > 1:
        rank = math.ceil(rank / config.round_to) * config.round_to
        note += f", rounded to x{config.round_to}"
    rank = min(rank, size)
    if rank >= size:
        return ModeChoice(mode, size, full_rank, vbmf_rank, sigma2, None, note + ": full size, mode kept")
    return ModeChoice(mode, size, full_rank, vbmf_rank, sigma2, rank, note)


_UNSET = object()


def choose_ranks(spectra: WeightSpectra, config: RankConfig, explicit: dict | None = None) -> RankChoice:
    """Choose the ranks of one layer from its spectra.

    ``explicit`` is this node's entry of the rank file (``{"out": .., "in": ..}`` or
    ``{"rank": ..}``), used when ``config.policy == "file"``.
    """
    use_file = config.policy == "file"
    explicit = explicit or {}

    def pick(key):
        return explicit.get(key, None) if use_file else _UNSET

    if spectra.matrix is not None:
        size = spectra.matrix[0].full_rank
        choice = _mode_choice("rank", size, spectra.matrix, config, pick("rank"))
        return RankChoice({"rank": choice.rank}, [choice])
    modes = [_mode_choice("out", spectra.out[0].shape[0], spectra.out, config, pick("out"))]
    if spectra.in_ is not None:
        modes.append(_mode_choice("in", spectra.in_[0].shape[0], spectra.in_, config, pick("in")))
    ranks = {"out": modes[0].rank, "in": modes[1].rank if len(modes) > 1 else None}
    return RankChoice(ranks, modes)


def load_rank_file(path: str | Path, known_nodes: dict[str, tuple[bool, int, int]]) -> dict[str, dict]:
    """Read and check an explicit rank file.

    The file is a JSON object keyed by Conv node name. A k x k conv takes ``{"out": R_out, "in":
    R_in}`` (either may be ``null`` = that mode not decomposed) or a list ``[R_out, R_in]``; a
    pointwise conv takes ``{"rank": R}`` or an integer. ``null`` for a node leaves it unchanged.
    Nodes not in the file are not decomposed.

    ``known_nodes`` maps each Conv node name to ``(is_pointwise, out_size, in_size)`` (per group).
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"rank file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"rank file {p} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"rank file {p} must hold a JSON object keyed by Conv node name, got {type(data).__name__}")
    unknown = sorted(set(data) - set(known_nodes))
    if unknown:
        some = ", ".join(sorted(known_nodes)[:5])
        raise UsageError(f"rank file {p} names unknown Conv node(s) {', '.join(unknown[:5])}; Conv nodes are e.g. {some}")
    ranks: dict[str, dict] = {}
    for name, value in data.items():
        pointwise, out_size, in_size = known_nodes[name]
        ranks[name] = _parse_rank_entry(p, name, value, pointwise, out_size, in_size)
    return ranks


def _parse_rank_entry(p: Path, name: str, value, pointwise: bool, out_size: int, in_size: int) -> dict:
    def check(key: str, r, size: int):
        if r is None:
            return None
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= size:
            raise UsageError(f"rank file {p}: node {name!r} {key} rank {r!r} must be an integer in [1, {size}] or null")
        return r

    if value is None:
        return {"rank": None} if pointwise else {"out": None, "in": None}
    if pointwise:
        if isinstance(value, dict):
            if set(value) - {"rank"}:
                raise UsageError(f"rank file {p}: pointwise node {name!r} takes {{\"rank\": R}}, got keys {sorted(value)}")
            value = value.get("rank")
        return {"rank": check("rank", value, min(out_size, in_size))}
    if isinstance(value, list) and len(value) == 2:
        value = {"out": value[0], "in": value[1]}
    if not isinstance(value, dict) or set(value) - {"out", "in"}:
        raise UsageError(f"rank file {p}: node {name!r} takes {{\"out\": R_out, \"in\": R_in}} or [R_out, R_in], got {value!r}")
    return {"out": check("out", value.get("out"), out_size), "in": check("in", value.get("in"), in_size)}
