"""Options of the compress pipeline, as frozen dataclasses (no mutable module-level settings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

RANK_POLICIES = ("vbmf", "weakened", "ratio", "energy", "error", "file")
RANK0_RULES = ("keep", "min")


@dataclass(frozen=True)
class RankConfig:
    """How ranks are chosen for each decomposed mode.

    policy:
        ``vbmf`` (EVBMF rank of each unfolding), ``weakened`` (``r = R - weaken * (R - r_vbmf)``),
        ``ratio`` (``ceil(ratio * R)``), ``energy`` (smallest rank keeping ``energy`` of the squared
        singular values), ``error`` (the cheapest ranks, in MACs, whose relative reconstruction
        error ``||W - W_chain|| / ||W||`` is at most ``target_error``; see
        :mod:`onnxfactor.methods.search`), ``file`` (explicit ranks per node name from ``rank_file``).
    weaken:
        The weakening factor w of the ``weakened`` policy; 1.0 is plain VBMF, 0.0 keeps full rank.
    target_error:
        The relative reconstruction error per layer of the ``error`` policy.
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
    target_error: float = 0.3
    rank_file: Path | None = None
    rank0: str = "keep"
    min_rank: int = 1
    round_to: int = 1


@dataclass(frozen=True)
class LatencyConfig:
    """Measured speed: which layers to keep, judged by ONNX Runtime timings (see :mod:`onnxfactor.latency`).

    margin:
        A decomposed layer is kept only if its chain runs at least ``1 + margin`` times as fast as
        the original Conv (timed alone at its real input shape, interleaved, median). The default
        0.05 is the repeat-to-repeat noise measured with one thread on a busy 2-core machine.
    rank_search:
        Also time each chain with its ranks rounded up to multiples of 8 and 16 (never a higher
        error: ranks only grow) and keep the fastest; ONNX Runtime's blocked CPU kernels work in
        channel blocks of 8 or 16, so a rank just above a multiple wastes most of a block.
    guard:
        Time the original and the compressed model end to end; while the compressed one is not
        faster, roll back the decomposed layers that saved the least measured time. A model
        that is still not faster is not written unless ``allow_slower``.
    target_speedup / max_latency_ms:
        A latency budget: the weakening level of the VBMF ranks and the layers to decompose are
        chosen to reach it with the smallest reconstruction error (see :mod:`onnxfactor.budget`).
    provider / threads:
        The ONNX Runtime execution provider (None: CUDA if available, else CPU) and intra-op
        threads (None: ONNX Runtime's default) to time with: the runtime the model is deployed on.
    """

    margin: float = 0.05
    rank_search: bool = True
    guard: bool = True
    allow_slower: bool = False
    target_speedup: float | None = None
    max_latency_ms: float | None = None
    provider: str | None = None
    threads: int | None = None


@dataclass(frozen=True)
class CompressConfig:
    """Options of :func:`onnxfactor.compress`.

    method:
        The decomposition: ``tucker2`` (default), ``cp3``, ``cp4`` or ``tucker3`` (spatial Tucker); see
        :mod:`onnxfactor.methods`. A CP fit that degenerates falls back to Tucker-2 for that layer.
        ``auto`` picks per layer the chain with the fewest MACs among all methods whose relative
        reconstruction error is no worse than Tucker-2's at the policy's ranks (or than
        ``ranks.target_error`` under the ``error`` policy); see :mod:`onnxfactor.methods.search`. With
        ``latency`` set, the other methods' chains found on the way are timed as well and the
        fastest measured chain wins.
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
    latency:
        ``None`` (the library default) decides by MACs alone; a :class:`LatencyConfig` times every
        decomposed layer and the whole model in ONNX Runtime and keeps only what is faster (the
        CLI's default, ``--no-measure`` turns it off).
    """

    ranks: RankConfig = field(default_factory=RankConfig)
    method: str = "tucker2"
    min_reduction: float | None = 0.1
    in_mode_min_channels: int = 4
    hooi_iters: int = 0
    nodes: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    latency: LatencyConfig | None = None
