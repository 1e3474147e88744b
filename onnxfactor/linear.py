"""Fully connected layers as candidates (``include_linear``): ``Gemm`` and ``MatMul`` with a constant 2-D weight.

A candidate computes ``Y = alpha A' W + beta C`` (Gemm; ``A' = A`` or ``A^T`` by ``transA``,
``W = B`` or ``B^T`` by ``transB``, ``K x N``) or ``Y = X W`` (MatMul, ``X`` of any rank). Its
weight is replaced by a truncated SVD ``W ~= P Q`` (``P``: ``K x r``, ``Q``: ``r x N``), written
as two nodes of the same op by :meth:`onnxfactor.rewrite.Rewriter.replace_linear`; exact at full
rank. This module finds the sites, chooses their ranks, fits the factors, makes the report rows and
times the chains; :mod:`onnxfactor.pipeline` only calls :func:`find_linear_sites`,
:func:`decompose_linear` and :func:`select_faster_linear`.

**Spectrum.** Of the smaller side ``n = min(K, N)``, as for Conv unfoldings
(:mod:`onnxfactor.spectral`): the eigendecomposition of the ``n x n`` Gram matrix in float64.
With ``K <= N`` (side ``in``) its vectors ``U`` give ``P = U_r``, ``Q = U_r^T W``; with
``K > N`` (side ``out``) the vectors ``V`` give ``P = W V_r``, ``Q = V_r^T`` (the same product
``U_r S_r V_r^T``, without dividing by a singular value).

**Ranks** (:class:`~onnxfactor.config.RankConfig`): ``vbmf`` (EVBMF of the matrix), ``weakened``,
``ratio``, ``energy``, ``file`` (``{"fc1": 12}`` or ``{"fc1": {"rank": 12}}``), ``round_to``,
``rank0`` / ``min_rank`` exactly as for a pointwise Conv (:func:`onnxfactor.ranks.policies.choose_ranks`);
``error``: the smallest rank (an SVD's MACs and parameters grow with it) whose relative error is
at most ``target_error``: ``||W - W_r|| / ||W||`` (Eckart-Young: from the singular values) or,
with calibration statistics, the relative L2 error of the layer's output on the calibration data.

**Data-aware fit** (calibration data, ``fit="data"``): with ``C = E[x x^T]`` over the rows ``x``
of the layer's input (``K``-vectors) and ``L L^T = C + ridge tr(C)/K I`` (Cholesky), the rank-``r``
``W_r`` minimising ``E ||x (W - W_r)||^2`` is ``L^-T [L^T W]_r``: the SVD ``L^T W = U S V^T``
gives ``P = L^-T U_r`` and ``Q = S_r V_r^T`` (SVD-LLM, Wang et al. 2024; DRONE, Chen et al. 2021).
For ``K > N`` the same ``W_r = W V_r V_r^T`` comes from the ``N x N`` matrix
``W^T (C + ridge tr(C)/K I) W = E[z z^T] + ridge tr(C)/K W^T W`` with ``z = x W``, so a
25088-wide input (VGG's fc6) never needs its ``K x K`` moment. The bias is unchanged: ``C`` is the
uncentred moment, so the factors are optimal for the output error including the mean.

**Output error** (``LayerReport.output_error``, with calibration data, whatever the fit): exact
from the moments, no tiles: ``E ||dY||^2 = alpha^2 tr(dW^T C dW)`` for ``dW = W - P Q``, split
over the components of the basis (``tr(W^T C W) - sum_{k <= r} g_k``), relative to the measured
``E ||Y||^2`` (bias included). The statistics take one streamed ONNX Runtime pass over the
calibration data with the layers' inputs and outputs exposed (:class:`~onnxfactor.calibration.probe.Probe`),
a pass of its own beside the Convs' (precomputed :class:`~onnxfactor.calibration.CalibrationData`
covers Convs only: the layers then keep the weight fit, with a note); memory ``8 n^2`` bytes per layer.

**MACs per sample** ``= rows x K x N`` (chain: ``rows x r (K + N)``), ``rows`` the product of the
output's dims between the first and the last: the first axis is the sample axis, as a Conv's N
(a classifier head's ``M x N`` Gemm has 1 row per sample; a MatMul on ``B x T x K`` has ``T``).

**Measured selection** (``config.latency``): each chain is timed against its node alone at the
layer's input shape, in two one-node micro models, with the same :class:`~onnxfactor.latency.Timer`
(and timing cache) as the Convs, and kept only if it runs ``1 + margin`` times as fast; the kept
chains take part in the end-to-end guard like the Convs. No rank-rounded variants are timed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxfactor.analysis import FLOAT_DTYPES, SkippedNode, WeightSite, iter_graphs, load_constant
from onnxfactor.calibration.fit import cholesky_whitening
from onnxfactor.config import CompressConfig, RankConfig
from onnxfactor.decompose import margin_reason, selection_reason
from onnxfactor.ranks.policies import ModeChoice, RankChoice, choose_ranks
from onnxfactor.ranks.vbmf import evbmf_from_singular_values
from onnxfactor.report import LayerReport
from onnxfactor.spectral import ModeSpectrum, WeightSpectra, gram_spectrum, tail_energy

LINEAR_OPS = ("Gemm", "MatMul")
#: Gemm before opset 7 broadcast C by an attribute; such models are not rewritten.
MIN_GEMM_OPSET = 7


def _known(shape) -> bool:
    return shape is not None and all(isinstance(d, (int, np.integer)) and d > 0 for d in shape)


@dataclass
class LinearSite(WeightSite):
    """A ``Gemm`` or ``MatMul`` whose weight (input B) is a constant 2-D float tensor: a candidate."""

    @property
    def op(self) -> str:
        return self.node.op

    def _attr(self, key: str, default):
        return self.node.attrs.get(key, default) if self.op == "Gemm" else default

    @property
    def alpha(self) -> float:
        return float(self._attr("alpha", 1.0))

    @property
    def trans_a(self) -> bool:
        return bool(self._attr("transA", 0))

    @property
    def trans_b(self) -> bool:
        return bool(self._attr("transB", 0))

    @property
    def in_features(self) -> int:
        """``K``: the contraction size."""
        return self.weight_shape[1 if self.trans_b else 0]

    @property
    def out_features(self) -> int:
        """``N``: the output size."""
        return self.weight_shape[0 if self.trans_b else 1]

    def weight_matrix(self) -> np.ndarray:
        """``W`` (``K x N``) as used: the B input, transposed when ``transB``."""
        w = load_constant(self.weight)
        return w.T if self.trans_b else w

    def bias_array(self) -> np.ndarray | None:
        """Gemm's C input as a constant, zeros of ``(N,)`` when computed at run time, None without one."""
        if self.op != "Gemm" or len(self.node.inputs) < 3 or not self.node.inputs[2].name:
            return None
        c = self.node.inputs[2]
        return load_constant(c) if isinstance(c, gs.Constant) else np.zeros(self.out_features, dtype=np.dtype(self.weight.dtype))

    def input_rows(self, a: np.ndarray) -> np.ndarray:
        """The rows ``x`` (``K``-vectors) of an input value ``a``: ``A`` / ``A^T`` (Gemm), ``X`` flattened (MatMul)."""
        if self.op == "Gemm":
            return a.T if self.trans_a else a
        return a.reshape(-1, a.shape[-1])

    @property
    def shapes_known(self) -> bool:
        return _known(self.input_shape) and _known(self.output_shape)

    @property
    def rows(self) -> int | None:
        """Rows per sample (module docstring): 1 for a Gemm or a MatMul on a matrix, None when unknown."""
        if self.op == "Gemm":
            return 1
        shape = self.input_shape
        if shape is None or (len(shape) >= 3 and not _known(shape[1:-1])):
            return None
        return int(math.prod(shape[1:-1])) if len(shape) >= 3 else 1

    @property
    def params(self) -> int:
        return self.in_features * self.out_features

    @property
    def macs(self) -> int | None:
        rows = self.rows
        return None if rows is None else rows * self.params


def _weight_reason(op: str, weight) -> str | None:
    """Why B is not a decomposable weight; ``""`` for a MatMul of two activations (not a layer, not listed)."""
    if isinstance(weight, gs.Constant):
        if np.dtype(weight.dtype) not in [np.dtype(d) for d in FLOAT_DTYPES]:
            return f"weight dtype {np.dtype(weight.dtype).name} is not a float type"
        if len(weight.shape) != 2 or 0 in tuple(weight.shape):
            return f"weight of shape {tuple(weight.shape)} is not a non-empty matrix"
        return None
    producers = [p.op for p in weight.inputs]
    if "DequantizeLinear" in producers:
        return "quantized weight (produced by DequantizeLinear); quantized layers are not decomposed"
    if not producers:
        return "weight is a graph input (can be overridden at run time), not a constant initializer"
    return f"weight is computed at run time (by {producers[0]}), not a constant" if op == "Gemm" else ""


def find_linear_sites(graph: gs.Graph, shapes: dict[str, tuple]) -> tuple[list[LinearSite], list[SkippedNode]]:
    """All Gemm / MatMul candidates in ``graph`` and its subgraphs, and the ones that are not (with the reason).

    A MatMul whose B is computed at run time (attention's ``Q K^T``) is no layer with a weight and is
    not listed; neither is a node whose inputs are both constants.
    """
    sites: list[LinearSite] = []
    skipped: list[SkippedNode] = []
    for path, g in iter_graphs(graph):
        for node in g.nodes:
            if node.op not in LINEAR_OPS or (node.domain or "") not in ("", "ai.onnx") or len(node.inputs) < 2:
                continue
            a, b = node.inputs[:2]
            if isinstance(a, gs.Constant):
                continue
            reason = _weight_reason(node.op, b)
            if reason is None and node.op == "Gemm" and int(g.opset or MIN_GEMM_OPSET) < MIN_GEMM_OPSET:
                reason = f"Gemm at opset {g.opset} (broadcast attribute) is not decomposed"
            if reason == "":
                continue
            if reason is not None:
                skipped.append(SkippedNode(node.name, node.op, path, reason))
                continue
            sites.append(LinearSite(node, g, path, b, shapes.get(a.name), shapes.get(node.outputs[0].name)))
    return sites, skipped


def share_key(site: LinearSite, chain: LinearChain) -> tuple:
    """Nodes that share a weight (same orientation) and get the same weight-fitted rank share their factors."""
    key = (site.graph_path, site.weight.name, site.trans_b, chain.method, chain.rank)
    return key + ((id(chain),) if chain.fit == "data" else ())


# --------------------------------------------------------------------------- chains


@dataclass(frozen=True)
class LinearChain:
    """The replacement of one fully connected layer: ``W ~= first @ second`` (``K x r`` then ``r x N``).

    ``rel_error`` is the fit's own relative error (of ``W``, or of the whitened ``L^T W`` for a data
    fit); ``output_error`` the relative L2 error of the layer's output on the calibration data.
    """

    ranks: dict
    first: np.ndarray
    second: np.ndarray
    rel_error: float | None = None
    output_error: float | None = None
    fit: str = "weights"
    method: str = "svd"
    bias: None = None  # the chain keeps the node's bias input (the pipeline's sharing rule reads this)

    def __post_init__(self):
        if self.first.ndim != 2 or self.second.ndim != 2 or self.first.shape[1] != self.second.shape[0]:
            raise ValueError(f"first.shape={self.first.shape} and second.shape={self.second.shape} do not chain")

    @property
    def rank(self) -> int:
        return int(self.first.shape[1])

    @property
    def params(self) -> int:
        return int(self.first.size + self.second.size)

    def macs(self, rows: int) -> int:
        return rows * self.params

    def reconstruct(self) -> np.ndarray:
        return self.first.astype(np.float64) @ self.second.astype(np.float64)


# --------------------------------------------------------------------------- statistics


@dataclass
class LinearStatistics:
    """Streamed sums over the rows of one layer's input on the calibration data (float64).

    ``side == "in"``: ``moment_sum = sum x x^T`` (``K x K``); ``"out"``: ``sum z z^T`` with
    ``z = x W`` (``N x N``). ``input_energy_sum = sum ||x||^2``, ``output_energy_sum = sum ||y||^2``
    of the original output (bias included), over ``rows`` rows.
    """

    side: str
    moment_sum: np.ndarray
    input_energy_sum: float = 0.0
    output_energy_sum: float = 0.0
    rows: int = 0

    def add(self, x: np.ndarray, y: np.ndarray, weight: np.ndarray | None) -> None:
        x64 = x.astype(np.float64)
        z = x64 if self.side == "in" else (x.astype(np.float32) @ weight).astype(np.float64)
        self.moment_sum += z.T @ z
        self.input_energy_sum += float(np.sum(np.square(x64)))
        self.output_energy_sum += float(np.sum(np.square(y.astype(np.float64))))
        self.rows += x.shape[0]

    @property
    def moment(self) -> np.ndarray:
        return self.moment_sum / max(self.rows, 1)

    @property
    def input_energy(self) -> float:
        return self.input_energy_sum / max(self.rows, 1)

    @property
    def output_energy(self) -> float:
        return self.output_energy_sum / max(self.rows, 1)


def _side(site: LinearSite) -> str:
    return "in" if site.in_features <= site.out_features else "out"


def collect_linear_statistics(model: onnx.ModelProto, sites: list[LinearSite], source, *, providers: list[str],
                              progress=None) -> dict[str, LinearStatistics]:
    """One pass of ``source`` (a :class:`onnxfactor.data.FeedSource`) through ``model`` (runnable as is)
    with the main-graph ``sites``' inputs and outputs exposed: their :class:`LinearStatistics`."""
    from onnxfactor.calibration.probe import Probe
    from onnxfactor.errors import UsageError

    main = [s for s in sites if s.graph_path == ""]
    if not main:
        return {}
    stats, weights = {}, {}
    for s in main:
        side = _side(s)
        n = s.in_features if side == "in" else s.out_features
        stats[s.name] = LinearStatistics(side, np.zeros((n, n)))
        weights[s.name] = None if side == "in" else np.asarray(s.weight_matrix(), dtype=np.float32)
    names = [t for s in main for t in (s.node.inputs[0].name, s.node.outputs[0].name)]
    probe = Probe(model, names, providers)
    seen = 0
    for batch in source.batches():
        acts = probe.run(batch.feeds)
        for s in main:
            x = s.input_rows(acts[s.node.inputs[0].name])
            stats[s.name].add(x, acts[s.node.outputs[0].name], weights[s.name])
        seen += batch.size
        if progress is not None:
            progress(seen, source.samples or 0, "linear layer statistics")
    if seen == 0:
        raise UsageError(f"the calibration data {source.describe} holds no samples (--calibration)")
    return stats


# --------------------------------------------------------------------------- fit


class LinearFit:
    """The spectrum one fully connected layer is decomposed from (module docstring), and its errors.

    ``stats`` (optional) gives output errors; with ``data`` the factors are fitted to the layer's
    output on the calibration data (falls back to the weight fit when the inputs are all zero).
    """

    def __init__(self, weight: np.ndarray, *, stats: LinearStatistics | None = None, data: bool = False,
                 ridge: float = 1e-3, alpha: float = 1.0):
        w = np.asarray(weight, dtype=np.float64)
        self.w, self.stats, self.alpha = w, stats, float(alpha)
        k, n = w.shape
        self.side = "in" if k <= n else "out"
        self.note = None
        if data and stats is not None and not stats.input_energy > 0:
            data, self.note = False, "the calibration inputs of this layer are all zero: weight-only fit"
        self.fit = "data" if data else "weights"
        self.lam = ridge * stats.input_energy / k if data else 0.0
        self.linv = None
        if self.side == "in":
            if data:
                lower, self.linv = cholesky_whitening(stats.moment, ridge)
                self.target = lower.T @ w  # A = L^T W
            else:
                self.target = w
            gram = self.target @ self.target.T
            shape = (k, n)
        else:
            self.target = w
            gram = w.T @ w
            if data:
                gram = stats.moment + self.lam * gram
            shape = (n, k)
        if stats is not None:  # tr(W^T C W): the output energy of x W (module docstring)
            if self.side == "out":
                self.total = float(np.trace(stats.moment))
            elif data:
                self.total = float(np.sum(np.square(self.target)) - self.lam * np.sum(np.square(w)))
            else:
                self.total = float(np.sum(stats.moment * gram))
        self.spectrum: ModeSpectrum = gram_spectrum(gram, shape)
        self.tail = tail_energy(np.square(self.spectrum.singular_values))

    @property
    def full_rank(self) -> int:
        return self.spectrum.full_rank

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """``(P, Q)`` at ``rank`` in float64 (module docstring)."""
        basis = self.spectrum.vectors[:, :rank]
        if self.side == "out":
            return self.w @ basis, basis.T
        first = basis if self.linv is None else self.linv.T @ basis
        return first, basis.T @ self.target

    def gains(self, rank: int, first: np.ndarray | None = None) -> np.ndarray:
        """``g_k`` for ``k < rank``: the output energy (``E ||x W_k||^2``, per row) each component carries."""
        basis = self.spectrum.vectors[:, :rank]
        moment = self.stats.moment
        if self.side == "out":
            return np.sum((moment @ basis) * basis, axis=0)
        s2 = np.square(self.spectrum.singular_values[:rank])
        if self.linv is None:
            return s2 * np.sum((moment @ basis) * basis, axis=0)
        first = self.linv.T @ basis if first is None else first
        return s2 * (1.0 - self.lam * np.sum(np.square(first), axis=0))

    def output_errors(self, gains: np.ndarray) -> np.ndarray:
        """Relative L2 output error at ranks ``0 .. len(gains)`` from the components' ``gains``."""
        dropped = np.clip(self.total - np.concatenate([[0.0], np.cumsum(gains)]), 0.0, None)
        numerator = abs(self.alpha) * np.sqrt(dropped)
        norm = math.sqrt(self.stats.output_energy)
        return numerator / norm if norm > 0 else numerator

    def decompose(self, rank: int) -> LinearChain:
        """The chain at ``rank`` with its own error and (with statistics) its output error."""
        first, second = self.factors(rank)
        rel_error = math.sqrt(self.tail[rank] / self.tail[0]) if self.tail[0] > 0 else 0.0
        output_error = None
        if self.stats is not None:
            output_error = float(self.output_errors(self.gains(rank, first if self.side == "in" else None))[-1])
        return LinearChain({"rank": rank}, first.astype(np.float32), second.astype(np.float32), rel_error=rel_error,
                           output_error=output_error, fit=self.fit)

    def choose(self, config: RankConfig, explicit: dict | None) -> RankChoice:
        """The policy's rank; ``error``: the smallest rank meeting ``target_error`` (module docstring)."""
        spectra = WeightSpectra(matrix=(self.spectrum,))
        if config.policy != "error":
            return choose_ranks(spectra, config, explicit)
        n = self.full_rank
        vbmf = evbmf_from_singular_values(self.spectrum.singular_values, self.spectrum.shape)
        target = config.target_error
        if self.stats is not None:
            errors, what = self.output_errors(self.gains(n)), "output error"
        else:
            errors = np.sqrt(self.tail / self.tail[0]) if self.tail[0] > 0 else np.zeros(n + 1)
            what = "relative error"
        rank = int(np.flatnonzero(errors <= target + 1e-12)[0]) if np.any(errors <= target + 1e-12) else n
        note = f"error ({what} <= {target:g} at rank {rank})"
        if rank <= 0:
            if config.rank0 == "keep":
                return RankChoice({"rank": None}, [ModeChoice("rank", n, n, vbmf.rank, vbmf.sigma2, None, note + ": layer kept")])
            rank, note = config.min_rank, note + f": min rank {config.min_rank}"
        if config.round_to > 1:
            rank, note = math.ceil(rank / config.round_to) * config.round_to, note + f", rounded to x{config.round_to}"
        if rank >= n:
            return RankChoice({"rank": None}, [ModeChoice("rank", n, n, vbmf.rank, vbmf.sigma2, None, note + ": full size, mode kept")])
        return RankChoice({"rank": rank}, [ModeChoice("rank", n, n, vbmf.rank, vbmf.sigma2, rank, note)])


# --------------------------------------------------------------------------- per-layer decisions


def _row(site: LinearSite) -> LayerReport:
    return LayerReport(
        name=site.name, graph_path=site.graph_path, status="kept", reason=None, weight_shape=list(site.weight_shape), group=1,
        kernel_shape=[], strides=[], input_shape=list(site.input_shape) if site.input_shape else None,
        output_shape=list(site.output_shape) if site.output_shape else None, params_before=site.params,
        macs_before=site.macs, op_type=site.op,
    )


def describe(layer: LayerReport, chain: LinearChain, site: LinearSite) -> None:
    """Fill ``layer``'s figures of ``chain``."""
    layer.method, layer.ranks = chain.method, dict(chain.ranks)
    layer.params_after = chain.params
    layer.macs_after = None if site.rows is None else chain.macs(site.rows)
    layer.rel_reconstruction_error = chain.rel_error
    layer.output_error = chain.output_error


def decide(site: LinearSite, config: CompressConfig, explicit: dict | None, stats: LinearStatistics | None = None,
           note: str | None = None) -> tuple[LayerReport, LinearChain | None]:
    """One layer's report row and its chain (None: kept, the row says why)."""
    start = time.perf_counter()
    layer = _row(site)
    layer.reason = selection_reason(site, config, explicit)
    if layer.reason is not None:
        return layer, None
    data = stats is not None and config.calibration.fit == "data"
    fit = LinearFit(site.weight_matrix(), stats=stats, data=data, ridge=config.calibration.ridge, alpha=site.alpha)
    layer.fit, layer.fit_note = fit.fit, fit.note or note
    choice = fit.choose(config.ranks, explicit.get(site.name) if explicit is not None else None)
    layer.modes = [m.to_dict() for m in choice.modes]
    chain = None
    if not choice.decomposes:
        layer.reason = "no mode worth decomposing (" + "; ".join(f"{m.mode}: {m.note}" for m in choice.modes) + ")"
    else:
        chain = fit.decompose(int(choice.ranks["rank"]))
        describe(layer, chain, site)
        layer.reason = margin_reason(layer, config.min_reduction)
        if layer.reason is not None:
            chain = None
    layer.seconds = time.perf_counter() - start
    return layer, chain


def decompose_linear(sites: list[LinearSite], config: CompressConfig, explicit: dict | None, *, model: onnx.ModelProto | None = None,
                     calibration=None, images=None, progress=None):
    """Every linear site's report row, and a :class:`onnxfactor.speed.Candidate` per chain to apply.

    ``calibration`` is the pipeline's (raw data, which costs one pass of ``model``, the runnable
    original; or precomputed Conv statistics, which leave these layers on the weight fit).
    """
    from onnxfactor.speed import Candidate

    stats, notes = _statistics(sites, config, explicit, model, calibration, images, progress)
    layers, candidates = [], []
    for index, site in enumerate(sites):
        layer, chain = decide(site, config, explicit, stats.get(site.name), notes.get(site.name))
        layers.append(layer)
        if chain is not None:
            candidates.append(Candidate(site, layer, [chain]))
        if progress is not None:
            progress(index + 1, len(sites), site.name)
    return layers, candidates


def _statistics(sites, config: CompressConfig, explicit, model, calibration, images, progress):
    from onnxfactor.calibration import CalibrationData

    if calibration is None:
        return {}, {}
    selected = [s for s in sites if selection_reason(s, config, explicit) is None]
    if isinstance(calibration, CalibrationData):
        return {}, {s.name: "precomputed calibration statistics (onnxfactor.calibrate) cover the Convs only: weight-only fit"
                    for s in selected}
    from onnxfactor.data import open_source
    from onnxfactor.validation import resolve_providers

    cal = config.calibration
    notes = {s.name: "inside a control-flow subgraph: its tensors cannot be exposed, weight-only fit" for s in selected if s.graph_path}
    if not any(s.graph_path == "" for s in selected):
        return {}, notes
    source = open_source(calibration, model, images=images, max_samples=cal.samples, batch_size=cal.batch_size, role="calibration")
    stats = collect_linear_statistics(model, selected, source, providers=resolve_providers(cal.provider), progress=progress)
    return stats, notes


# --------------------------------------------------------------------------- measured speed


def layer_model(site: LinearSite, *, opset: int | None = None) -> onnx.ModelProto:
    """A standalone one-node model of ``site`` at its input shape (weight, bias and attributes kept)."""
    from onnxfactor.latency import DEFAULT_OPSET

    if not _known(site.input_shape):
        raise ValueError(f"{site.op} {site.name!r}: input shape {site.input_shape} is not fully known (--input-shape)")
    node = site.node
    weight = site.weight_array()
    dtype = np.dtype(weight.dtype)
    x = gs.Variable(node.inputs[0].name, dtype=dtype, shape=[int(d) for d in site.input_shape])
    inputs = [x, gs.Constant(site.weight.name, weight)]
    bias = site.bias_array()
    if bias is not None:
        inputs.append(gs.Constant(node.inputs[2].name, np.asarray(bias, dtype=dtype)))
    y = gs.Variable(node.outputs[0].name, dtype=dtype, shape=list(site.output_shape) if site.output_shape else None)
    graph = gs.Graph(nodes=[gs.Node(op=node.op, name=node.name, attrs=dict(node.attrs), inputs=inputs, outputs=[y])],
                     inputs=[x], outputs=[y], name=f"layer_{node.name}", opset=int(opset or DEFAULT_OPSET))
    model = gs.export_onnx(graph)
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import))
    return model


def chain_model(layer: onnx.ModelProto, chain: LinearChain) -> onnx.ModelProto:
    """``layer`` (a :func:`layer_model`) with its node replaced by ``chain``, by the pipeline's rewrite."""
    from onnxfactor.rewrite import Rewriter, export_model

    model = onnx.ModelProto()
    model.CopyFrom(layer)
    graph = gs.import_onnx(model)
    (node,) = graph.nodes
    site = LinearSite(node, graph, "", node.inputs[1], tuple(node.inputs[0].shape), None)
    Rewriter(graph).replace_linear(site, chain, share_key=(node.name,))
    return export_model(graph, model)


def select_faster_linear(candidates: list, timer, *, margin: float, opset: int | None = None) -> None:
    """Time each candidate's node against its chain; drop the chain unless it is ``1 + margin`` times as fast.

    Updates the candidates (``chain``, ``timing``) and their rows (``latency``, ``reason``), as
    :func:`onnxfactor.speed.select_faster_layers` does for Convs; untimeable ones stay as they are.
    """
    from onnxfactor.speed import judge_timing, time_options

    for c in candidates:
        if c.chain is None:
            continue
        timings = time_options(timer, c.site, [c.chain], opset=opset, timing=_time_chains)
        if isinstance(timings, str):
            c.layer.latency = {"note": f"{timings}: kept by MACs"}
            continue
        c.timing, c.option_timings = timings[0], timings
        judge_timing(c, margin)


def _time_chains(timer, site: LinearSite, chains: list, *, opset: int | None) -> list:
    """:func:`onnxfactor.latency.time_chains` for a fully connected site (its one-node micro models)."""
    from onnxfactor.latency import LayerTiming, layer_feeds

    original = layer_model(site, opset=opset)
    feeds = layer_feeds(original)
    return [LayerTiming.from_pair(timer.time_pair(original, chain_model(original, chain), feeds)) for chain in chains]


__all__ = ["LINEAR_OPS", "LinearChain", "LinearFit", "LinearSite", "LinearStatistics", "collect_linear_statistics",
           "decide", "decompose_linear", "find_linear_sites", "select_faster_linear", "share_key"]
