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
    timing_cache:
        A JSON file of earlier timings (see :mod:`onnxfactor.timing_cache`): pairs already timed on
        this machine and provider are not timed again, so a repeated run writes the same model.
    """

    margin: float = 0.05
    rank_search: bool = True
    guard: bool = True
    allow_slower: bool = False
    target_speedup: float | None = None
    max_latency_ms: float | None = None
    provider: str | None = None
    threads: int | None = None
    timing_cache: Path | None = None


FIT_CHOICES = ("data", "weights")
TRAIN_CHOICES = ("factors", "all")


@dataclass(frozen=True)
class FinetuneConfig:
    """Label-free distillation of the compressed model from the original (see :mod:`onnxfactor.finetune`).

    epochs / steps:
        Passes over the fine-tuning data, or (``steps`` set) that many optimiser steps.
    lr:
        Adam's learning rate, decayed to 0 on a cosine over the steps.
    batch_size:
        Samples per step (batches of the data are split or read at this size).
    device:
        ``cpu`` or ``cuda``; None: CUDA when torch sees it, else CPU.
    train:
        ``factors`` (default): only the decomposed chains' weights and biases; ``all``: every float
        initializer but batch-norm statistics.
    temperature:
        Of the KL term on classifier-like outputs (``N x C``).
    feature_weight:
        Weight of the feature term: MSE at every decomposed layer's output tensor against the
        original's tensor of the same name, relative to its mean square.
    label_weight:
        Weight of the cross-entropy on labels, when the data has them (0, the default: label-free).
    seed / deterministic:
        torch's seed; ``deterministic`` asks torch for deterministic algorithms.
    threads:
        torch intra-op threads (None: torch's default).
    stage_size:
        Iterative compress + fine-tune (:mod:`onnxfactor.finetune.iterative`): decompose this many
        Convs per stage, fine-tune, re-estimate the next stage's ranks; None: one shot.
    """

    epochs: float = 1.0
    steps: int | None = None
    lr: float = 1e-3
    batch_size: int = 64
    device: str | None = None
    train: str = "factors"
    temperature: float = 4.0
    feature_weight: float = 1.0
    label_weight: float = 0.0
    seed: int = 0
    deterministic: bool = False
    threads: int | None = None
    stage_size: int | None = None


@dataclass(frozen=True)
class CalibrationConfig:
    """How calibration data is used (see :mod:`onnxfactor.calibration`); inactive without calibration data.

    fit:
        ``data`` (default): factors minimise the layer's output error on the calibration inputs
        (input-whitened fit, response-covariance output basis, bias correction); ``weights``: the
        weight-only fit, as without calibration data.
    correct:
        Sequential correction: in topological order, refit the last conv of every chain (weights
        and bias, ridge least squares) to the original model's output at the same tensor, on
        inputs produced by the already compressed upstream network.
    reconstruct_steps:
        Layer-wise reconstruction with PyTorch (``[finetune]`` extra): that many Adam steps per chain
        on all its factors, after the correction; 0 = off. ``reconstruct_lr`` is Adam's step size.
    samples:
        Use at most this many calibration samples (None: all).
    memory_mb:
        Budget for the calibration stage's own arrays: exposed activations of two runs (the one
        being added and the next, computed meanwhile), tiles and
        the cached tile samples each get a quarter; the moment matrices come on top (reported).
        During the correction the cut tensors of the compressed and the original network on the
        cached samples get a quarter each (:mod:`onnxfactor.calibration.segments`).
    ridge:
        Ridge of the input covariance before its Cholesky factor, relative to its mean eigenvalue:
        ``C + ridge * tr(C) / n * I``. It bounds how much the fit trusts directions the calibration
        inputs never excite (see :mod:`onnxfactor.calibration.fit`).
    correct_ridge:
        Ridge of the correction's least squares, relative to the mean eigenvalue of the features'
        covariance, pulling the refitted factor towards the current one.
    stages:
        At most this many correction passes (``--correction-passes``; 0: one per layer): the chains
        are split, in topological order, into that many groups corrected together (one ONNX Runtime
        pass over the tile samples each). In a grouped pass the group's original Convs compute
        its layers' outputs and the chains run beside them, so a layer is fitted as if its
        in-group upstream layers were exact; a pass that makes the network's held-out output
        worse is bisected down to the layers that do, which are undone. On NudeNet 320n at VBMF
        ranks (63 chains; worst output error on other photos): 0.064 with 8 passes in 59 s,
        0.060 with one per layer in 172 s, 0.080 uncorrected (README, "Accuracy from calibration
        data"). Models with at most 8 decomposed layers (the bundled ones) get one pass per
        layer either way.
    correction_samples:
        The samples the correction passes run on (and the tiles come from): that many, spread evenly
        over the calibration data (fewer when their feeds would exceed a quarter of ``memory_mb``).
    correction_positions:
        At most this many pixels per layer enter the correction's least squares (a random subset
        of each correction sample's output pixels).
    tiles:
        Input tiles kept per layer (``TILE_EXTENT`` output positions each) for measured output
        errors and the reconstruction.
    seed:
        Seed of the tile sampling.
    provider:
        ONNX Runtime execution provider of the calibration runs (None: CUDA if available, else CPU).
    batch_size:
        Samples per batch read from an ``.npz`` or an image folder (runs are split further to stay
        within ``memory_mb``).
    """

    fit: str = "data"
    correct: bool = True
    reconstruct_steps: int = 0
    reconstruct_lr: float = 1e-3
    samples: int | None = None
    memory_mb: float = 1024.0
    ridge: float = 1e-3
    correct_ridge: float = 1e-3
    stages: int = 8
    correction_samples: int = 128
    correction_positions: int = 1 << 18
    tiles: int = 512
    seed: int = 0
    provider: str | None = None
    batch_size: int = 64


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
    calibration:
        How calibration data is used when :func:`onnxfactor.compress` gets some (``calibration=``);
        see :class:`CalibrationConfig`.
    include_linear:
        Also decompose the fully connected layers: ``Gemm`` and ``MatMul`` nodes whose weight (input
        B) is a constant 2-D float initializer, by truncated SVD into two nodes of the same op, with
        the same ``ranks`` policies, ``min_reduction``, ``nodes`` / ``exclude``, data-aware fit and
        measured selection as the Convs (see :mod:`onnxfactor.linear`). ``method``, ``hooi_iters``
        and ``in_mode_min_channels`` do not apply to them. Their counts go into the report's
        ``linear_*`` totals, not the ``conv_*`` ones (see :class:`onnxfactor.report.Totals`).
    fold_batchnorm:
        Fold every inference-mode ``BatchNormalization`` that follows a Conv into that Conv before
        anything is fitted (exact; :mod:`onnxfactor.batchnorm`), so the factors approximate the map
        the layer applies. Off by default: on real Paddle exports it helped some settings and hurt
        others (measured in :mod:`onnxfactor.batchnorm`). The report's parameter counts are then
        those of the folded model. If no layer is decomposed, the written model is the input file,
        batch norms included.
    """

    ranks: RankConfig = field(default_factory=RankConfig)
    method: str = "tucker2"
    min_reduction: float | None = 0.1
    in_mode_min_channels: int = 4
    hooi_iters: int = 0
    nodes: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    latency: LatencyConfig | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    include_linear: bool = False
    fold_batchnorm: bool = False
