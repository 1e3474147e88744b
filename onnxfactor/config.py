"""Options of the compress pipeline, as frozen dataclasses (no mutable module-level settings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

RANK_POLICIES = ("vbmf", "weakened", "ratio", "energy", "file")
RANK0_RULES = ("keep", "min")


@dataclass(frozen=True)
class RankConfig:
    """How ranks are chosen for each decomposed mode.

    policy:
        ``vbmf`` (EVBMF rank of each unfolding), ``weakened`` (``r = R - weaken * (R - r_vbmf)``),
        ``ratio`` (``ceil(ratio * R)``), ``energy`` (smallest rank keeping ``energy`` of the squared
        singular values), ``file`` (explicit ranks per node name from ``rank_file``).
    weaken:
        The weakening factor w of the ``weakened`` policy; 1.0 is plain VBMF, 0.0 keeps full rank.
    rank0:
        What to do when VBMF says a mode is pure noise (rank 0): ``keep`` leaves that mode
        undecomposed (and the layer unchanged if no mode is left), ``min`` uses ``min_rank``.
    round_to:
        Round each rank up to a multiple of this (capped at the mode size); 1 disables rounding.
    """

    policy: str = "vbmf"
    weaken: float = 0.6
    ratio: float = 0.5
    energy: float = 0.95
    rank_file: Path | None = None
    rank0: str = "keep"
    min_rank: int = 1
    round_to: int = 1


@dataclass(frozen=True)
class CompressConfig:
    """Options of :func:`onnxfactor.compress`.

    method:
        The decomposition: ``tucker2`` (default), ``cp3``, ``cp4`` or ``tucker3`` (spatial Tucker); see
        :mod:`onnxfactor.methods`. A CP fit that degenerates falls back to Tucker-2 for that layer.
    min_reduction:
        A layer is decomposed only if both its MACs and its parameter count drop by at least this
        fraction (0.1 = 10 %). ``None`` decomposes every eligible layer regardless (used to test
        exactness at full rank).
    in_mode_min_channels:
        Convs with at most this many input channels (e.g. the first RGB conv) are decomposed on the
        output mode only.
    hooi_iters:
        0 uses the HOSVD (fast default); > 0 refines the factors with that many HOOI sweeps (tensorly).
    nodes / exclude:
        Restrict decomposition to (or exclude) these node names.
    """

    ranks: RankConfig = field(default_factory=RankConfig)
    method: str = "tucker2"
    min_reduction: float | None = 0.1
    in_mode_min_channels: int = 4
    hooi_iters: int = 0
    nodes: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
