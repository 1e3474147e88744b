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

Spatial Tucker (``tucker3``) adds the spatial mode (the ``prod(kernel) x C_out C_in`` unfolding)
to the two channel modes, with the same rules. CP (``cp3`` / ``cp4``) has one rank for the whole
layer: see :func:`choose_cp_rank`.

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
from onnxfactor.ranks.vbmf import evbmf_from_singular_values
from onnxfactor.spectral import ModeSpectrum, WeightSpectra

#: the methods a rank-file entry may name (``onnxfactor.methods.METHODS``; ranks/ does not import methods/)
METHOD_NAMES = ("tucker2", "cp3", "cp4", "tucker3")


@dataclass(frozen=True)
class ModeChoice:
    """The rank decision for one mode of one layer (a row of the per-layer report)."""

    mode: str                   # "out", "in", "spatial", or "rank" (pointwise SVD, CP)
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
    rank, note = _after_policy(_policy_rank(config, spectra, full_rank, vbmf_rank), config.policy, config, "mode kept")
    if rank is None:
        return ModeChoice(mode, size, full_rank, vbmf_rank, sigma2, None, note)
    rank = min(rank, size)
    if rank >= size:
        return ModeChoice(mode, size, full_rank, vbmf_rank, sigma2, None, note + ": full size, mode kept")
    return ModeChoice(mode, size, full_rank, vbmf_rank, sigma2, rank, note)


def _after_policy(rank: int, note: str, config: RankConfig, kept: str) -> tuple[int | None, str]:
    """The rank-0 and rounding rules applied to a policy's rank (``None`` = not decomposed)."""
    if rank <= 0:
        if config.rank0 == "keep":
            return None, f"rank 0 (noise): {kept}"
        rank, note = config.min_rank, f"rank 0 (noise): min rank {config.min_rank}"
    if config.round_to > 1:
        rank = math.ceil(rank / config.round_to) * config.round_to
        note += f", rounded to x{config.round_to}"
    return rank, note


_UNSET = object()


def choose_ranks(spectra: WeightSpectra, config: RankConfig, explicit: dict | None = None) -> RankChoice:
    """Choose the ranks of one layer from its spectra.

    ``explicit`` is this node's entry of the rank file (``{"out": .., "in": ..}``, with
    ``"spatial"`` for spatial Tucker, or ``{"rank": ..}``), used when ``config.policy == "file"``.
    The spatial mode is chosen only when ``spectra.spatial`` was computed.
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
    if spectra.spatial is not None:
        modes.append(_mode_choice("spatial", spectra.spatial[0].shape[0], spectra.spatial, config, pick("spatial")))
        ranks["spatial"] = modes[-1].rank
    return RankChoice(ranks, modes)


def choose_cp_rank(spectra: WeightSpectra, config: RankConfig, explicit: dict | None = None) -> RankChoice:
    """The CP rank of one layer, ``{"rank": R}``, from the spectra of its unfoldings.

    VBMF rank (Astrid & Lee, "CP-decomposition with tensor power method for convolutional neural
    networks compression", BigComp 2017): the maximum of the EVBMF ranks of the unfoldings of the
    3-way weight ``O x I x K`` (``O x IK``, ``I x OK``, ``K x OI``), each the maximum over groups.
    A CP of rank ``R`` has unfoldings of matrix rank ``<= R``, so the largest rank any unfolding
    asks for is the natural lower bound. A conv with few input channels (``spectra.in_`` not
    computed) uses the ``O x IK`` unfolding only.

    weakened / ratio / energy use ``R_full = max over unfoldings of min(L, M)`` (the largest
    matrix rank any unfolding can have: the smallest CP rank that could be exact for a generic
    weight is at least that) in the formulas of the module docstring; energy takes the largest of
    the unfoldings' energy ranks. Then the rank-0 and rounding rules; the rank is capped at
    ``R_full``. There is no "full size" rule: whether a CP chain pays off is the pipeline's
    ``min_reduction`` check. An explicit ``{"rank": R}`` is taken as given. Pointwise convs (CP
    of a matrix = truncated SVD) get :func:`choose_ranks`'s SVD rank.
    """
    if spectra.matrix is not None:
        return choose_ranks(spectra, config, explicit)
    unfoldings = {"out": spectra.out, "in": spectra.in_, "spatial": spectra.spatial}
    unfoldings = {k: v for k, v in unfoldings.items() if v is not None}
    if spectra.in_ is None:
        unfoldings = {"out": spectra.out}
    full_rank = max(v[0].full_rank for v in unfoldings.values())
    vbmf = {k: _vbmf(v) for k, v in unfoldings.items()}
    vbmf_rank = max(r for r, _ in vbmf.values())
    sigma2 = float(np.mean([s2 for _, s2 in vbmf.values()]))
    detail = "max of VBMF ranks " + ", ".join(f"{k} {r}" for k, (r, _) in vbmf.items())

    if config.policy == "file":
        rank = (explicit or {}).get("rank")
        note = "explicit (rank file)" if rank is not None else "not decomposed (rank file)"
        return RankChoice({"rank": rank}, [ModeChoice("rank", full_rank, full_rank, vbmf_rank, sigma2, rank, note)])
    if config.policy == "energy":
        policy_rank = max(_energy_rank(v, config.energy) for v in unfoldings.values())
    else:
        policy_rank = _policy_rank(config, None, full_rank, vbmf_rank)
    rank, note = _after_policy(policy_rank, f"{config.policy} ({detail})", config, "layer kept")
    if rank is not None:
        rank = min(rank, full_rank)
    return RankChoice({"rank": rank}, [ModeChoice("rank", full_rank, full_rank, vbmf_rank, sigma2, rank, note)])


class RankEntries(dict):
    """A rank file's entries (node name -> ranks) and, in ``methods``, the nodes that name their own
    method (``{"method": "cp3", "rank": 12}``): per-layer methods, as the search's allocation chooses."""

    def __init__(self, entries=(), methods: dict[str, str] | None = None):
        super().__init__(entries)
        self.methods = dict(methods or {})


def load_rank_file(
    path: str | Path, known_nodes: dict[str, tuple[bool, int, int]], method: str = "tucker2"
) -> RankEntries:
    """Read and check an explicit rank file.

    The file is a JSON object keyed by Conv node name. With ``method="tucker2"`` a k x k conv
    takes ``{"out": R_out, "in": R_in}`` (either may be ``null`` = that mode not decomposed) or a
    list ``[R_out, R_in]``; with ``"tucker3"`` also ``"spatial"`` (list ``[R_out, R_in,
    R_spatial]``); with ``"cp3"`` / ``"cp4"`` ``{"rank": R}`` or an integer (any ``R >= 1``: a CP
    rank may exceed every mode size). A pointwise conv takes ``{"rank": R}`` or an integer for
    every method. ``null`` for a node leaves it unchanged. Nodes not in the file are not decomposed.
    An entry may name its own method, ``{"method": "cp3", "rank": 12}`` (ranks as that method takes
    them): it overrides ``method`` for that node; with ``method="auto"`` every entry must name one.

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
    ranks, methods = {}, {}
    for name, value in data.items():
        pointwise, out_size, in_size = known_nodes[name]
        own = method
        if isinstance(value, dict) and "method" in value:
            own = value["method"]
            if own not in METHOD_NAMES:
                raise UsageError(f"rank file {p}: node {name!r} method {own!r} is not one of {', '.join(METHOD_NAMES)}")
            methods[name] = own
            value = {k: v for k, v in value.items() if k != "method"}
            if not pointwise and own in ("tucker2", "tucker3") and not value:
                raise UsageError(f"rank file {p}: node {name!r} names method {own!r} but no ranks")
        elif method == "auto" and value is not None:
            raise UsageError(f"rank file {p}: node {name!r} must name its method ({{\"method\": \"tucker2\", \"out\": R_out, \"in\": R_in}}) "
                             f"with --method auto, or choose --method tucker2, cp3, cp4 or tucker3")
        ranks[name] = _parse_rank_entry(p, name, value, pointwise, out_size, in_size, own)
    return RankEntries(ranks, methods)


def _parse_rank_entry(p: Path, name: str, value, pointwise: bool, out_size: int, in_size: int, method: str = "tucker2") -> dict:
    def check(key: str, r, size: int | None):
        if r is None:
            return None
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= (size or r):
            bound = f"in [1, {size}]" if size else ">= 1"
            raise UsageError(f"rank file {p}: node {name!r} {key} rank {r!r} must be an integer {bound} or null")
        return r

    cp = method in ("cp3", "cp4")
    if value is None:
        return {"rank": None} if pointwise or cp else {"out": None, "in": None}
    if cp and not pointwise:
        if isinstance(value, dict):
            if set(value) - {"rank"}:
                raise UsageError(f"rank file {p}: node {name!r} takes {{\"rank\": R}} for {method}, got keys {sorted(value)}")
            value = value.get("rank")
        return {"rank": check("CP", value, None)}
    if method == "tucker3" and not pointwise:
        if isinstance(value, list) and len(value) == 3:
            value = {"out": value[0], "in": value[1], "spatial": value[2]}
        if not isinstance(value, dict) or set(value) - {"out", "in", "spatial"}:
            raise UsageError(f"rank file {p}: node {name!r} takes {{\"out\": R_out, \"in\": R_in, \"spatial\": R_s}} "
                             f"or [R_out, R_in, R_s] for tucker3, got {value!r}")
        return {"out": check("out", value.get("out"), out_size), "in": check("in", value.get("in"), in_size),
                "spatial": check("spatial", value.get("spatial"), None)}
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
