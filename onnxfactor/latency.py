"""Is a decomposed layer really faster? Time one Conv against its chain on the deployment provider.

MACs predict speed poorly for small or thin convs: each extra node of a chain costs a kernel
launch, a layout change and a pass over memory, so three small convs can be slower than the one
they replace. This module measures instead of predicting:

* :func:`layer_model` builds a tiny standalone model of one Conv site at its real input shape
  (weight, bias and attributes as in the source, dtype kept), optionally with the activation that
  follows it; :func:`chain_model` rewrites that model's Conv into a chain with
  :class:`onnxfactor.rewrite.Rewriter`, so the chain's geometry is exactly what the pipeline
  writes; :func:`layer_models` does both.
* A :class:`Timer` times two models on the same feeds and returns a :class:`PairTiming`.
  :class:`OrtTimer` runs ONNX Runtime sessions made with ``make_session(measuring=True)``,
  interleaved and adaptively (it stops once the ratio of the medians is stable);
  :class:`FakeTimer` returns synthetic costs (:func:`macs_cost`, :func:`node_cost`) for tests.
* :func:`time_layer` / :func:`time_chains` tie them together into :class:`LayerTiming` results. Two whole models are timed
  with the same ``timer.time_pair(original, compressed, feeds)``; :class:`OrtTimer`'s
  ``max_seconds`` keeps that bounded for large models.

Activation fusion. ONNX Runtime fuses a Conv with a following Relu, LeakyRelu, Clip (constant
bounds), Sigmoid, HardSigmoid or Tanh when the Conv's output has no other use: into
``com.microsoft.FusedConv`` at ``ORT_ENABLE_EXTENDED`` and into the NCHWc Conv's ``activation`` at
``ORT_ENABLE_ALL`` (the default, which ``make_session`` keeps), for float32 on CPU (1.31). The
rewrite keeps the fusion: the chain's last conv writes the original output tensor, so the
activation follows it and is fused into it. By default (``with_activation=True``) the micro models
include that activation when it is the Conv's only consumer, so they are optimised as the Conv is
in the real model: where the fusion holds on both sides the activation costs (almost) nothing on
either, and where it does not (another provider, float16) the timing shows it. Other activations
(HardSwish, Elu, ...) and residual Adds are left out: they cost the same after either Conv.
On CPU ONNX Runtime runs float16 Convs in float32 between Cast nodes and fuses less there
(LeakyRelu and Clip not at all).

Layout. At ``ORT_ENABLE_ALL`` on x86 the convs run in the blocked NCHWc layout (block 16 with
AVX-512, 8 with AVX2). A chain whose ranks are below the block size gets ``ReorderOutput`` nodes
between its convs, so ranks that are multiples of 16 can be markedly faster than slightly larger
ones (128 -> 128, 3x3: ranks 96 ran 1.2-1.3x faster than the original, ranks 100 about 1.0x).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxfactor.analysis import ConvSite, infer_shapes
from onnxfactor.errors import UsageError
from onnxfactor.methods.base import ChainSpec, ConvGeometry, conv_macs
from onnxfactor.rewrite import Rewriter, export_model
from onnxfactor.validation.compare import LATENCY_WARMUP, LatencyStats, measure_latency
from onnxfactor.validation.providers import make_session

log = logging.getLogger(__name__)

#: Activations ONNX Runtime fuses into a preceding Conv (ConvActivationFusion / NCHWc transformer).
FUSED_ACTIVATIONS = ("Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "Tanh")
#: Default-domain opset of the micro models when the caller gives none; at least 11 is used
#: (Clip takes its bounds as inputs from opset 11 on; Conv is the same in all of them).
DEFAULT_OPSET = 17
_MIN_OPSET = 11


# --------------------------------------------------------------------------- micro models


def layer_model(site: ConvSite, *, opset: int | None = None, with_activation: bool = True) -> onnx.ModelProto:
    """A standalone model of ``site``'s Conv at its input shape: the "original" side of a timing.

    The input is named like the Conv's input, has ``site.input_shape`` and the weight's dtype; the
    Conv keeps its name, attributes, weight and bias (a bias computed at run time becomes a zero
    constant of its shape: the timing does not depend on its values). With ``with_activation``,
    the Conv's only consumer is included when it is one of :data:`FUSED_ACTIVATIONS` (see the
    module docstring); the model's output is then the activation's. ``opset`` should be the source
    model's default-domain opset (None: :data:`DEFAULT_OPSET`); it is raised to 11 if lower.

    Raises ValueError when ``site.input_shape`` is not fully known (fix: give the model's input
    shapes, ``--input-shape``).
    """
    node = site.node
    shape = site.input_shape
    if shape is None or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
        raise ValueError(
            f"Conv {node.name!r}: input shape {shape} is not fully known; "
            f"set the model's input shapes (--input-shape) so that shape inference reaches this layer"
        )
    weight = site.weight_array()
    dtype = np.dtype(weight.dtype)
    x = gs.Variable(node.inputs[0].name, dtype=dtype, shape=[int(d) for d in shape])
    inputs = [x, gs.Constant(site.weight.name, weight)]
    if len(node.inputs) > 2 and node.inputs[2].name:
        inputs.append(gs.Constant(node.inputs[2].name, _constant_values(node.inputs[2], dtype, (weight.shape[0],))))
    out_shape = list(site.output_shape) if site.output_shape else None
    y = gs.Variable(node.outputs[0].name, dtype=dtype, shape=out_shape)
    nodes = [gs.Node(op="Conv", name=node.name, attrs=dict(node.attrs), inputs=inputs, outputs=[y])]
    activation = fused_activation(site) if with_activation else None
    if activation is not None:
        out = gs.Variable(activation.outputs[0].name, dtype=dtype, shape=out_shape)
        nodes.append(_copy_activation(activation, y, out, dtype))
        y = out
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=[y], name=f"layer_{node.name}",
                     opset=max(int(opset or DEFAULT_OPSET), _MIN_OPSET))
    model = gs.export_onnx(graph)
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import))
    return model


def chain_model(layer: onnx.ModelProto, chain: ChainSpec) -> onnx.ModelProto:
    """``layer`` (a :func:`layer_model`) with its Conv replaced by ``chain``: the "compressed" side.

    The replacement is :meth:`Rewriter.replace` on an onnx-graphsurgeon import of ``layer`` and
    :func:`export_model`, as in the pipeline. ``layer`` itself is not changed. Raises ValueError
    when ``layer`` has not exactly one Conv or ``chain`` does not fit its channels.
    """
    model = onnx.ModelProto()
    model.CopyFrom(layer)
    graph = gs.import_onnx(model)
    convs = [n for n in graph.nodes if n.op == "Conv"]
    if len(convs) != 1:
        raise ValueError(f"a layer model has exactly one Conv, this one has {len(convs)}; build it with layer_model()")
    node = convs[0]
    weight = node.inputs[1]
    _check_chain_fits(node.name, tuple(int(d) for d in weight.shape), int(node.attrs.get("group", 1)), chain)
    site = ConvSite(
        node=node,
        graph=graph,
        graph_path="",
        geometry=ConvGeometry.from_attrs(node.attrs, tuple(weight.shape)),
        weight=weight,
        input_shape=tuple(node.inputs[0].shape) if node.inputs[0].shape else None,
        output_shape=tuple(node.outputs[0].shape) if node.outputs[0].shape else None,
    )
    Rewriter(graph).replace(site, chain, share_key=(node.name,))
    return export_model(graph, model)


def layer_models(
    site: ConvSite, chain: ChainSpec, *, opset: int | None = None, with_activation: bool = True
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """``(original, decomposed)`` micro models of ``site``: :func:`layer_model` and its :func:`chain_model`.

    To time several chains of one layer, build :func:`layer_model` once and call
    :func:`chain_model` per chain.
    """
    original = layer_model(site, opset=opset, with_activation=with_activation)
    return original, chain_model(original, chain)


def layer_feeds(model: onnx.ModelProto, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded standard-normal values for a micro model's input (its dtype and shape)."""
    (value,) = [v for v in model.graph.input if v.name not in {t.name for t in model.graph.initializer}]
    tensor = value.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
    shape = [d.dim_value for d in tensor.shape.dim]
    return {value.name: np.random.default_rng(seed).standard_normal(shape).astype(dtype)}


def fused_activation(site: ConvSite) -> gs.Node | None:
    """The activation ONNX Runtime would fuse into ``site``'s Conv, or None.

    That is the Conv output's only consumer, when it is one of :data:`FUSED_ACTIVATIONS` in the
    default domain, the output is not also a graph output, and (for Clip) its bounds are constants.
    """
    out = site.node.outputs[0]
    if len(out.outputs) != 1 or any(o is out for o in site.graph.outputs):
        return None
    consumer = out.outputs[0]
    if consumer.op not in FUSED_ACTIVATIONS or (consumer.domain or "") not in ("", "ai.onnx"):
        return None
    if consumer.inputs[0] is not out:
        return None
    if consumer.op == "Clip" and any(t.name and not isinstance(t, gs.Constant) for t in consumer.inputs[1:]):
        return None
    return consumer


def _constant_values(tensor, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A Constant's values as ``dtype``; zeros of ``shape`` for a tensor computed at run time."""
    if isinstance(tensor, gs.Constant):
        lazy = tensor._values  # load without caching the array in the source graph (see ConvSite.weight_array)
        values = lazy.load() if isinstance(lazy, gs.ir.tensor.LazyValues) else np.asarray(tensor.values)
        return np.asarray(values, dtype=dtype)
    return np.zeros(shape, dtype=dtype)


def _copy_activation(node: gs.Node, x: gs.Variable, out: gs.Variable, dtype: np.dtype) -> gs.Node:
    """A copy of activation ``node`` reading ``x``; Clip's bounds become constant inputs (opset >= 11 form)."""
    attrs = dict(node.attrs)
    inputs = [x]
    if node.op == "Clip":
        bounds = {"min": attrs.pop("min", None), "max": attrs.pop("max", None)}  # opset < 11 attributes
        for index, key in enumerate(("min", "max"), start=1):
            source = node.inputs[index] if len(node.inputs) > index else None
            if source is not None and source.name:
                value = _constant_values(source, dtype, ()).reshape(())  # a constant scalar (fused_activation checked)
            elif bounds[key] is not None:
                value = np.asarray(bounds[key], dtype=dtype)
            else:
                inputs.append(gs.Variable.empty())
                continue
            inputs.append(gs.Constant(f"{node.name}/{key}", value))
        while len(inputs) > 1 and not inputs[-1].name:
            inputs.pop()
    return gs.Node(op=node.op, name=node.name, attrs=attrs, inputs=inputs, outputs=[out])


def _check_chain_fits(name: str, weight_shape: tuple[int, ...], group: int, chain: ChainSpec) -> None:
    if not chain.convs:
        raise ValueError(f"Conv {name!r}: the chain has no convs")
    first, last = chain.convs[0], chain.convs[-1]
    c_in = weight_shape[1] * group
    chain_in = first.weight.shape[1] * first.group
    if chain_in != c_in or last.weight.shape[0] != weight_shape[0]:
        raise ValueError(
            f"Conv {name!r} maps {c_in} -> {weight_shape[0]} channels but the chain maps "
            f"{chain_in} -> {last.weight.shape[0]}; decompose this Conv's own weight"
        )


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class PairTiming:
    """Latency of two models timed together; unpacks as ``a_ms, b_ms = timing`` (the medians).

    ``converged`` is False when the timer stopped at its run or time limit before the ratio of
    the medians was stable.
    """

    a: LatencyStats
    b: LatencyStats
    converged: bool = True

    @property
    def a_ms(self) -> float:
        return self.a.median_ms

    @property
    def b_ms(self) -> float:
        return self.b.median_ms

    @property
    def ratio(self) -> float:
        """``b_ms / a_ms`` (inf when ``a_ms`` is 0)."""
        return self.b_ms / self.a_ms if self.a_ms > 0 else math.inf

    def __iter__(self) -> Iterator[float]:
        yield self.a_ms
        yield self.b_ms


@dataclass(frozen=True)
class LayerTiming:
    """Median latency of one layer, original Conv against its chain, in milliseconds."""

    original_ms: float
    chain_ms: float
    runs: int
    converged: bool = True

    @classmethod
    def from_pair(cls, pair: PairTiming) -> LayerTiming:
        runs = min(pair.a.runs, pair.b.runs)
        return cls(original_ms=pair.a_ms, chain_ms=pair.b_ms, runs=runs, converged=pair.converged)

    @property
    def speedup(self) -> float:
        """``original_ms / chain_ms``: above 1 the chain is faster (inf when ``chain_ms`` is 0)."""
        return self.original_ms / self.chain_ms if self.chain_ms > 0 else math.inf

    @property
    def faster(self) -> bool:
        return self.speedup > 1.0

    def to_dict(self) -> dict:
        """Plain values plus ``speedup``."""
        out = asdict(self)
        out["speedup"] = self.speedup
        return out


# --------------------------------------------------------------------------- timers


class Timer(Protocol):
    """Times two models on the same feeds."""

    def time_pair(self, a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> PairTiming:
        """Latency of ``a`` and of ``b`` on ``feeds`` (medians in ms, see :class:`PairTiming`)."""
        ...


class OrtTimer:
    """Times two models in ONNX Runtime, interleaved, until the ratio of their medians is stable.

    Sessions come from ``make_session(model, providers, threads=threads, measuring=True)``: same
    options for both, no spinning threads, default graph optimisations (fusions included). After
    ``warmup`` untimed runs each, runs come in rounds of two :func:`measure_latency` batches of
    ``batch`` runs (a round is ``2 * batch`` runs of each model), one in order A, B, A, B, ... and
    one in order B, A, B, A, ... (so neither model always runs on the caches the other just warmed).
    A model's latency is the median of its batch medians; p10/p90 are the medians of the batch
    p10/p90 (the spread within a batch).
    After each round from the second on, once ``min_runs`` runs of each are done, timing stops when
    ``b_ms / a_ms`` moved by at most ``rel_tol`` (relative) since the previous round, or at
    ``max_runs`` runs of each, or once ``max_seconds`` are spent running (warm-up included; checked
    after each round): the last two bound whole-model timings. Session creation is neither timed
    nor budgeted.
    """

    def __init__(
        self,
        providers: list[str],
        threads: int | None = None,
        *,
        min_runs: int = 20,
        max_runs: int = 100,
        rel_tol: float = 0.03,
        batch: int = 5,
        warmup: int = LATENCY_WARMUP,
        max_seconds: float | None = 10.0,
    ):
        if batch < 1 or 2 * batch > max_runs or not 1 <= min_runs <= max_runs or warmup < 0:
            raise UsageError(
                f"latency runs must satisfy batch >= 1, 2 * batch <= max_runs, 1 <= min_runs <= max_runs and "
                f"warmup >= 0; got batch={batch}, min_runs={min_runs}, max_runs={max_runs}, warmup={warmup}"
            )
        if not rel_tol > 0:
            raise UsageError(f"latency tolerance rel_tol must be > 0, got {rel_tol!r}")
        if max_seconds is not None and not max_seconds > 0:
            raise UsageError(f"latency time budget max_seconds must be > 0 or None, got {max_seconds!r}")
        self.providers = list(providers)
        self.threads = threads
        self.min_runs, self.max_runs, self.rel_tol = min_runs, max_runs, rel_tol
        self.batch, self.warmup, self.max_seconds = batch, warmup, max_seconds

    def time_pair(self, a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> PairTiming:
        session_a = make_session(a, self.providers, threads=self.threads, measuring=True)
        session_b = make_session(b, self.providers, threads=self.threads, measuring=True)
        stats_a: list[LatencyStats] = []
        stats_b: list[LatencyStats] = []
        previous: float | None = None
        converged = False
        warmup = self.warmup
        start = time.perf_counter()
        while True:
            sa, sb = measure_latency([session_a, session_b], feeds, runs=self.batch, warmup=warmup)
            sb2, sa2 = measure_latency([session_b, session_a], feeds, runs=self.batch, warmup=0)
            warmup = 0
            stats_a += [sa, sa2]
            stats_b += [sb, sb2]
            runs = self.batch * len(stats_a)
            timing = PairTiming(_pooled(stats_a), _pooled(stats_b))
            if runs >= self.min_runs and previous is not None and abs(timing.ratio / previous - 1) <= self.rel_tol:
                converged = True
                break
            previous = timing.ratio
            if runs + 2 * self.batch > self.max_runs:
                break
            if self.max_seconds is not None and time.perf_counter() - start > self.max_seconds:
                break
        log.debug("timed %d runs each: %.4g ms vs %.4g ms (converged: %s)", runs, timing.a_ms, timing.b_ms, converged)
        return PairTiming(timing.a, timing.b, converged)


def _pooled(batches: list[LatencyStats]) -> LatencyStats:
    """The median of per-batch medians (and of their p10/p90), over all runs of the batches."""
    return LatencyStats(
        median_ms=float(np.median([s.median_ms for s in batches])),
        p10_ms=float(np.median([s.p10_ms for s in batches])),
        p90_ms=float(np.median([s.p90_ms for s in batches])),
        runs=sum(s.runs for s in batches),
    )


def macs_cost(model: onnx.ModelProto, *, per_mac_ms: float = 1e-6, per_node_ms: float = 0.01) -> float:
    """Synthetic latency: ``per_node_ms`` per main-graph node plus ``per_mac_ms`` per Conv MAC.

    A Conv's MACs are its weight size times its output's spatial size (ONNX shape inference; the
    model's inputs need fixed shapes). With a large ``per_node_ms`` many small convs cost more
    than one big conv, as on real hardware. Raises ValueError when a Conv's shapes are unknown.
    """
    shapes = infer_shapes(model, {})
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    total = 0.0
    for node in model.graph.node:
        total += per_node_ms
        if node.op_type != "Conv":
            continue
        weight_shape = weights.get(node.input[1])
        out_shape = shapes.get(node.output[0])
        if weight_shape is None or out_shape is None or not all(isinstance(d, int) and d > 0 for d in out_shape[2:]):
            raise ValueError(
                f"macs_cost: Conv {node.name!r} has weight shape {weight_shape} and output shape {out_shape}; "
                f"a constant weight and fixed input shapes are needed"
            )
        total += per_mac_ms * conv_macs(weight_shape, math.prod(out_shape[2:]))
    return total


def node_cost(table: Mapping[str, float], default: float = 0.0) -> Callable[[onnx.ModelProto], float]:
    """A cost function summing ``table[node.name]`` (``default`` for other names) over the main graph's nodes."""

    def cost(model: onnx.ModelProto) -> float:
        return float(sum(table.get(node.name, default) for node in model.graph.node))

    return cost


@dataclass
class FakeTimer:
    """A deterministic :class:`Timer` for tests: each model "takes" ``cost(model)`` ms.

    Every call is recorded in ``calls`` as ``(a, b, feeds)``.
    """

    cost: Callable[[onnx.ModelProto], float] = macs_cost
    calls: list[tuple[onnx.ModelProto, onnx.ModelProto, dict]] = field(default_factory=list)

    def time_pair(self, a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> PairTiming:
        self.calls.append((a, b, feeds))
        return PairTiming(_constant_stats(float(self.cost(a))), _constant_stats(float(self.cost(b))))


def _constant_stats(ms: float) -> LatencyStats:
    return LatencyStats(median_ms=ms, p10_ms=ms, p90_ms=ms, runs=1)


# --------------------------------------------------------------------------- one layer


def time_layer(
    timer: Timer,
    site: ConvSite,
    chain: ChainSpec,
    *,
    opset: int | None = None,
    with_activation: bool = True,
    seed: int = 0,
) -> LayerTiming:
    """Time ``site``'s Conv against ``chain`` with ``timer`` on seeded random input (see :func:`layer_models`)."""
    return time_chains(timer, site, [chain], opset=opset, with_activation=with_activation, seed=seed)[0]


def time_chains(
    timer: Timer,
    site: ConvSite,
    chains: list[ChainSpec],
    *,
    opset: int | None = None,
    with_activation: bool = True,
    seed: int = 0,
) -> list[LayerTiming]:
    """:func:`time_layer` for several chains of one layer: the original micro model and its input
    are built once, each chain is timed against it."""
    original = layer_model(site, opset=opset, with_activation=with_activation)
    feeds = layer_feeds(original, seed=seed)
    return [LayerTiming.from_pair(timer.time_pair(original, chain_model(original, chain), feeds)) for chain in chains]
