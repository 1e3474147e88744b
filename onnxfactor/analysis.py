"""Find the Conv sites of a graph, their geometry, shapes and cost, and why others are skipped.

Works on an onnx-graphsurgeon graph (main graph and every If/Loop/Scan subgraph, recursively)
plus a map of tensor shapes from ONNX shape inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxfactor.methods.base import ConvGeometry, conv_macs

QUANTIZED_CONV_OPS = ("ConvInteger", "QLinearConv")
OTHER_CONV_OPS = ("ConvTranspose",)
FLOAT_DTYPES = (np.float16, np.float32, np.float64)
# Large initializers are replaced by typed graph inputs before shape inference: shape inference
# only needs their shapes, and copying a 100 MB model just to infer shapes would double memory.
_SKELETON_MAX_ELEMENTS = 4096


def load_constant(tensor: gs.Constant) -> np.ndarray:
    """A Constant's values as a numpy array, without caching them in the graph.

    onnx-graphsurgeon's ``Constant.values`` replaces the lazy TensorProto view by the loaded
    array for good, which would keep a second copy of every weight alive (2x model memory).
    """
    lazy = tensor._values
    return lazy.load() if isinstance(lazy, gs.ir.tensor.LazyValues) else np.asarray(tensor.values)


@dataclass
class WeightSite:
    """A node with a constant weight, where it sits and its input / output shapes (``None`` when unknown)."""

    node: gs.Node
    graph: gs.Graph
    graph_path: str
    weight: gs.Constant
    input_shape: tuple | None
    output_shape: tuple | None

    @property
    def name(self) -> str:
        return self.node.name

    def weight_array(self) -> np.ndarray:
        """The weight as a numpy array, without caching it in the graph (:func:`load_constant`)."""
        return load_constant(self.weight)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.weight.shape)


@dataclass
class ConvSite(WeightSite):
    """A Conv node whose weight is a constant float tensor: a candidate for decomposition."""

    geometry: ConvGeometry

    @property
    def in_spatial(self) -> int | None:
        return _spatial(self.input_shape)

    @property
    def out_spatial(self) -> int | None:
        return _spatial(self.output_shape)

    @property
    def params(self) -> int:
        return int(math.prod(self.weight_shape))

    @property
    def macs(self) -> int | None:
        """MACs per sample (batch 1), or None when the output shape is unknown."""
        return None if self.out_spatial is None else conv_macs(self.weight_shape, self.out_spatial)

    @property
    def in_per_group(self) -> int:
        return self.weight_shape[1]

    @property
    def out_per_group(self) -> int:
        return self.weight_shape[0] // self.geometry.group


@dataclass(frozen=True)
class SkippedNode:
    """A conv-like node that is not a candidate, with the reason."""

    name: str
    op_type: str
    graph_path: str
    reason: str


def _spatial(shape) -> int | None:
    if shape is None or len(shape) < 3 or any(not isinstance(d, int) or d <= 0 for d in shape[2:]):
        return None
    return int(math.prod(shape[2:]))


def iter_graphs(graph: gs.Graph, path: str = ""):
    """Yield ``(path, graph)`` for ``graph`` and, depth first, every subgraph held in node attributes."""
    yield path, graph
    for node in graph.nodes:
        for attr_name, value in node.attrs.items():
            subgraphs = value if isinstance(value, list) else [value]
            for sub in subgraphs:
                if isinstance(sub, gs.Graph):
                    yield from iter_graphs(sub, f"{path}{node.name}.{attr_name}/")


def name_unnamed_nodes(graph: gs.Graph) -> None:
    """Give every unnamed node a stable, unique name ``<op>_<index>`` (reports and rank files key on names)."""
    all_graphs = list(iter_graphs(graph))
    used = {n.name for _, g in all_graphs for n in g.nodes if n.name}
    for path, g in all_graphs:
        for index, node in enumerate(g.nodes):
            if node.name:
                continue
            base = f"{path}{node.op}_{index}"
            name, k = base, 1
            while name in used:
                name, k = f"{base}_{k}", k + 1
            node.name = name
            used.add(name)


def infer_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple]:
    """Tensor name -> shape (ints, or None for unknown dims) by ONNX shape inference.

    Graph inputs are fixed to ``input_shapes`` first, so spatial sizes come out concrete. Runs on
    a skeleton of the model without large weight data. Returns ``{}`` if inference fails.
    """
    skel = onnx.ModelProto()
    skel.ir_version = max(model.ir_version, 4)
    skel.opset_import.extend(model.opset_import)
    skel.functions.extend(model.functions)
    g = skel.graph
    g.node.extend(model.graph.node)
    g.output.extend(model.graph.output)
    for vi in model.graph.input:
        new = g.input.add()
        new.CopyFrom(vi)
        if vi.name in input_shapes and vi.type.HasField("tensor_type"):
            new.type.tensor_type.shape.Clear()
            for d in input_shapes[vi.name]:
                new.type.tensor_type.shape.dim.add().dim_value = int(d)
    input_names = {vi.name for vi in g.input}
    for init in model.graph.initializer:
        if math.prod(init.dims) <= _SKELETON_MAX_ELEMENTS or init.data_type == onnx.TensorProto.INT64:
            g.initializer.append(init)
        elif init.name not in input_names:
            g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(skel, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - shape inference failing on an exotic model only costs MAC figures
        return {}
    shapes: dict[str, tuple] = {}
    _collect_shapes(inferred.graph, shapes)
    return shapes


def record_shapes(model: onnx.ModelProto, ir_version: int, input_shapes: dict, names: list[str]) -> dict[str, tuple]:
    """Shapes of main-graph tensors ``names`` from one ONNX Runtime run on random inputs.

    The fallback when shape inference loses track (e.g. Reshape with computed shapes in the
    PP-OCRv4 recogniser's transformer). Returns ``{}`` if the model does not run.
    """
    from onnxfactor.io import restore_conventions
    from onnxfactor.validation import make_inputs

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    restore_conventions(probe, ir_version)
    known = {o.name for o in probe.graph.output}
    wanted = [n for n in dict.fromkeys(names) if n not in known]
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in wanted)
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4  # a failing probe is expected on some models; stay quiet
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        del probe
        feeds = make_inputs(model, shapes=input_shapes).batches[0]
        values = session.run(wanted, feeds)
    except Exception:  # noqa: BLE001 - a probe that fails only costs MAC figures
        return {}
    return {n: tuple(int(d) for d in v.shape) for n, v in zip(wanted, values)}


def _collect_shapes(graph: onnx.GraphProto, shapes: dict) -> None:
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = tuple(
                d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim
            )
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _collect_shapes(attr.g, shapes)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _collect_shapes(sub, shapes)


def _weight_skip_reason(weight) -> str | None:
    if isinstance(weight, gs.Constant):
        if np.dtype(weight.dtype) not in [np.dtype(d) for d in FLOAT_DTYPES]:
            return f"weight dtype {np.dtype(weight.dtype).name} is not a float type"
        return None
    producers = [p.op for p in weight.inputs]
    if "DequantizeLinear" in producers:
        return "quantized weight (produced by DequantizeLinear); quantized convs are not decomposed"
    if producers:
        return f"weight is computed at run time (by {producers[0]}), not a constant"
    return "weight is a graph input (can be overridden at run time), not a constant initializer"


def find_conv_sites(graph: gs.Graph, shapes: dict[str, tuple]) -> tuple[list[ConvSite], list[SkippedNode]]:
    """All Conv candidates in ``graph`` and its subgraphs, and the conv-like nodes that are not."""
    sites: list[ConvSite] = []
    skipped: list[SkippedNode] = []
    for path, g in iter_graphs(graph):
        for node in g.nodes:
            if node.op in QUANTIZED_CONV_OPS:
                skipped.append(SkippedNode(node.name, node.op, path, f"quantized conv ({node.op}) is not decomposed"))
                continue
            if node.op in OTHER_CONV_OPS:
                skipped.append(SkippedNode(node.name, node.op, path, f"{node.op} is not decomposed"))
                continue
            if node.op != "Conv" or (node.domain or "") not in ("", "ai.onnx"):
                continue
            if len(node.inputs) < 2:
                skipped.append(SkippedNode(node.name, node.op, path, "Conv without a weight input"))
                continue
            weight = node.inputs[1]
            reason = _weight_skip_reason(weight)
            if reason is None and (len(weight.shape) < 3 or math.prod(weight.shape) == 0):
                reason = f"weight of shape {tuple(weight.shape)} is not a conv kernel"
            if reason is None:
                geometry = ConvGeometry.from_attrs(node.attrs, tuple(weight.shape))
                if geometry.group > 1 and weight.shape[1] == 1:
                    reason = f"depthwise conv (group={geometry.group}, one input channel per group): no channel mode to decompose"
            if reason is not None:
                skipped.append(SkippedNode(node.name, node.op, path, reason))
                continue
            sites.append(
                ConvSite(
                    node=node,
                    graph=g,
                    graph_path=path,
                    geometry=geometry,
                    weight=weight,
                    input_shape=shapes.get(node.inputs[0].name),
                    output_shape=shapes.get(node.outputs[0].name),
                )
            )
    return sites, skipped


def count_params(model: onnx.ModelProto) -> int:
    """Elements of every initializer of ``model``, subgraphs (If / Loop bodies) included."""
    total = 0

    def visit(graph: onnx.GraphProto):
        nonlocal total
        total += sum(math.prod(t.dims) for t in graph.initializer)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        visit(sub)

    visit(model.graph)
    return total
