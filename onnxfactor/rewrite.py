"""The only module that edits the graph: replace a Conv node by the chain of a :class:`ChainSpec`
(and a Gemm / MatMul by its two-node SVD chain, :meth:`Rewriter.replace_linear`).

Following onnx-graphsurgeon's "replace a subgraph" recipe: the new nodes take the old node's
input (and bias), the last one writes the old node's output tensor (so every consumer and graph
output is untouched), and the old node is disconnected and removed in place, which keeps the
node order topological. New names derive from the old node's name: ``<node>/<method>_<role>``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from onnxfactor.analysis import ConvSite, iter_graphs
from onnxfactor.methods.base import ChainSpec, geometry_attrs



class Rewriter:
    """Applies chains to one graph; shares factor tensors between Convs that shared a weight."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self._names = {n.name for _, g in iter_graphs(graph) for n in g.nodes}
        self._names |= {t for _, g in iter_graphs(graph) for t in g.tensors()}
        self._factor_cache: dict[tuple, gs.Constant] = {}

    def _unique(self, name: str) -> str:
        candidate, k = name, 1
        while candidate in self._names:
            candidate, k = f"{name}_{k}", k + 1
        self._names.add(candidate)
        return candidate

    def replace(self, site: ConvSite, chain: ChainSpec, share_key: tuple) -> list[str]:
        """Replace ``site.node`` by ``chain``; returns the names of the new nodes.

        ``share_key`` identifies the (weight, ranks) pair: Convs that shared the original weight
        and got the same ranks share the factor initializers too.
        """
        node, graph = site.node, site.graph
        dtype = np.dtype(site.weight.dtype)
        x = node.inputs[0]
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        final_output = node.outputs[0]
        base = node.name
        new_nodes = []
        for index, conv in enumerate(chain.convs):
            key = (*share_key, conv.role)
            weight = self._factor_cache.get(key)
            if weight is None:
                weight = gs.Constant(self._unique(f"{base}/{chain.method}_{conv.role}_weight"), conv.weight.astype(dtype))
                self._factor_cache[key] = weight
            attrs = geometry_attrs(conv, node.attrs)
            attrs["kernel_shape"] = [int(k) for k in conv.weight.shape[2:]]
            attrs["group"] = int(conv.group)
            conv_bias = bias
            if conv.takes_bias and chain.bias is not None:  # a refitted bias: a tensor of its own
                conv_bias = gs.Constant(self._unique(f"{base}/{chain.method}_bias"), np.asarray(chain.bias).astype(dtype))
            inputs = [x, weight] + ([conv_bias] if conv.takes_bias and conv_bias is not None else [])
            last = index == len(chain.convs) - 1
            out = final_output if last else gs.Variable(self._unique(f"{base}/{chain.method}_{conv.role}_out"), dtype=dtype)
            new_nodes.append(
                gs.Node(op="Conv", name=self._unique(f"{base}/{chain.method}_{conv.role}"), attrs=attrs, inputs=inputs, outputs=[out])
            )
            x = out
        _swap(graph, node, new_nodes)
        return [n.name for n in new_nodes]

    def replace_linear(self, site, chain, share_key: tuple) -> list[str]:
        """Replace a fully connected node by two of the same op; returns the new node names.

        ``site`` is a :class:`onnxfactor.linear.LinearSite` whose weight is ``W = B'`` (``K x N``,
        ``B`` or ``B^T`` by ``transB``) and ``chain`` a :class:`onnxfactor.linear.LinearChain`,
        ``W ~= P Q`` with ``P = chain.first`` (``K x r``) and ``Q = chain.second`` (``r x N``), both
        stored as they are used (``transB = 0``)::

            Gemm(A, B, C; alpha, beta, transA, transB) -> Gemm(A, P; alpha, transA) -> Gemm(H, Q, C; beta)
            MatMul(X, B)                                -> MatMul(X, P)              -> MatMul(H, Q)

        so ``alpha A' P Q + beta C = alpha A' W + beta C``: the second node carries the original
        bias input ``C`` (any broadcastable shape, or none) and beta, the first alpha and transA;
        MatMul keeps any batch dims of ``X``. Before opset 11, where Gemm's C is required, the
        first Gemm gets a one-element zero C. ``share_key`` as in :meth:`replace`.
        """
        node, graph = site.node, site.graph
        dtype = np.dtype(site.weight.dtype)
        base = node.name
        factors = []
        for role, values in (("first", chain.first), ("last", chain.second)):
            key = (*share_key, role)
            tensor = self._factor_cache.get(key)
            if tensor is None:
                name = self._unique(f"{base}/{chain.method}_{role}_weight")
                tensor = gs.Constant(name, np.ascontiguousarray(np.asarray(values).astype(dtype)))
                self._factor_cache[key] = tensor
            factors.append(tensor)
        hidden = gs.Variable(self._unique(f"{base}/{chain.method}_first_out"), dtype=dtype)
        first_inputs, last_inputs = [node.inputs[0], factors[0]], [hidden, factors[1]]
        first_attrs, last_attrs = {}, {}
        if node.op == "Gemm":
            alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
            trans_a = int(node.attrs.get("transA", 0))
            first_attrs = {**({"alpha": alpha} if alpha != 1.0 else {}), **({"transA": trans_a} if trans_a else {})}
            bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
            if bias is not None:
                last_inputs.append(bias)
                if beta != 1.0:
                    last_attrs["beta"] = beta
            if int(getattr(graph, "opset", None) or self.graph.opset or 11) < 11:
                first_inputs.append(gs.Constant(self._unique(f"{base}/{chain.method}_first_zero"), np.zeros(1, dtype=dtype)))
        new_nodes = [
            gs.Node(op=node.op, name=self._unique(f"{base}/{chain.method}_first"), attrs=first_attrs, inputs=first_inputs,
                    outputs=[hidden]),
            gs.Node(op=node.op, name=self._unique(f"{base}/{chain.method}_last"), attrs=last_attrs, inputs=last_inputs,
                    outputs=[node.outputs[0]]),
        ]
        _swap(graph, node, new_nodes)
        return [n.name for n in new_nodes]


def _swap(graph: gs.Graph, node: gs.Node, new_nodes: list[gs.Node]) -> None:
    """Disconnect ``node`` and put ``new_nodes`` at its place (which keeps the node order topological)."""
    position = graph.nodes.index(node)
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes[position : position + 1] = new_nodes


def export_model(graph: gs.Graph, model: onnx.ModelProto) -> onnx.ModelProto:
    """Write the rewritten ``graph`` back into ``model``, the ModelProto it was imported from; returns ``model``.

    ``model`` must be ours to change (:func:`onnxfactor.io.load_model` parsed or copied it). Its
    main graph's nodes, inputs, outputs and value_info become what onnx-graphsurgeon exports for
    ``graph``; its initializers are edited in place: the ones ``graph`` still uses stay where they
    are, the others (replaced Conv weights, folded leftovers) are deleted, and the new factor
    tensors are appended. IR version, opsets, metadata and functions are those of ``model``.

    ``gs.export_onnx`` is not used for the main graph because it builds a new ModelProto and copies
    every kept initializer into it: the weights that are not decomposed (VGG-19's 490 MB of Gemm
    weights) would then exist twice, and protobuf arenas release nothing until the whole model goes.
    Subgraphs are exported by onnx-graphsurgeon as they are (with copies, which are small).
    """
    exporter = OnnxExporter  # gs's public per-object exporters, as gs.export_onnx uses them
    # Export everything first: subgraph exports read main-graph initializers removed below.
    nodes = [exporter.export_node(node) for node in graph.nodes]
    inputs = [exporter.export_value_info_proto(t, do_type_check=False) for t in graph.inputs]
    outputs = [exporter.export_value_info_proto(t, do_type_check=False) for t in graph.outputs]
    tensors = graph.tensors()
    io_names = {t.name for t in graph.inputs + graph.outputs}
    value_info = [
        exporter.export_value_info_proto(t, do_type_check=False)
        for name, t in tensors.items()
        if name not in io_names and isinstance(t, gs.Variable) and (t.dtype is not None or t.shape is not None)
    ]
    constants = [t for t in tensors.values() if isinstance(t, gs.Constant)]
    # Main-graph tensors a subgraph reads from the enclosing scope stay here too; the subgraphs'
    # exported copies of them are then dropped by _hoist_shared_initializers.
    subgraphs = [sub for path, sub in iter_graphs(graph) if path]
    outer_reads = [t for sub in subgraphs for t in sub.tensors().values() if isinstance(t, gs.Constant)]

    onnx_graph = model.graph
    # onnx-graphsurgeon can drop a shape it could not represent (a tensor's type kept, its shape
    # lost): a valid model would come out failing onnx.checker. The rewrite keeps every tensor
    # name's shape, so the source's declaration of the same name is restored where that happens.
    declared = {v.name: v for v in (*onnx_graph.output, *onnx_graph.value_info) if _has_shape(v)}
    outputs = [_keep_shape(v, declared) for v in outputs]
    value_info = [_keep_shape(v, declared) for v in value_info]
    dense = [t for t in constants if not isinstance(t._values, SparseValues)]
    sparse = [t for t in constants if isinstance(t._values, SparseValues)]
    new_dense = _keep_used(onnx_graph.initializer, dense, outer_reads)
    new_sparse = _keep_used(onnx_graph.sparse_initializer, sparse, outer_reads)
    onnx_graph.initializer.extend(exporter.export_tensor_proto(t) for t in new_dense)
    onnx_graph.sparse_initializer.extend(exporter.export_sparse_tensor_proto(t) for t in new_sparse)
    for field, values in (("node", nodes), ("input", inputs), ("output", outputs), ("value_info", value_info)):
        container = getattr(onnx_graph, field)
        del container[:]
        container.extend(values)
    _hoist_shared_initializers(onnx_graph)
    return model


def _has_shape(value: onnx.ValueInfoProto) -> bool:
    return value.type.WhichOneof("value") == "tensor_type" and value.type.tensor_type.HasField("shape")


def _keep_shape(value: onnx.ValueInfoProto, declared: dict) -> onnx.ValueInfoProto:
    """``value``, or the source's declaration of the same tensor when ``value`` lost its shape."""
    source = declared.get(value.name)
    if source is not None and not _has_shape(value):
        kept = onnx.ValueInfoProto()
        kept.CopyFrom(source)
        return kept
    return value


def _keep_used(stored, used: list[gs.Constant], outer_reads: list[gs.Constant]) -> list[gs.Constant]:
    """Delete from ``stored`` (a repeated TensorProto field) the tensors no Constant wraps; return the Constants to add.

    A Constant imported from this graph wraps its TensorProto itself (``LazyValues.tensor``; gs has
    no public accessor), so identity tells which stored tensors are still in use. Deleting by index
    leaves the others in place (no copy); the Constants with values of their own (new factors) are
    returned. A kept tensor takes its Constant's name, as gs's ``export_tensor_proto`` would give it.
    """
    wrapping = {id(t._values.tensor): t for t in (*outer_reads, *used) if isinstance(t._values, LazyValues)}
    kept = set()
    for index in reversed(range(len(stored))):
        tensor = stored[index]
        constant = wrapping.get(id(tensor))
        if constant is None:
            del stored[index]
            continue
        kept.add(id(tensor))
        if tensor.name != constant.name:
            tensor.name = constant.name
    return [t for t in used if not (isinstance(t._values, LazyValues) and id(t._values.tensor) in kept)]


def _graphs_with_paths(graph: onnx.GraphProto, path: tuple = ()):
    yield path, graph
    for ni, node in enumerate(graph.node):
        for ai, attr in enumerate(node.attribute):
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for si, sub in enumerate(subs):
                yield from _graphs_with_paths(sub, (*path, (ni, ai, si)))


def _hoist_shared_initializers(root: onnx.GraphProto) -> None:
    """Store each initializer once, in the innermost graph that encloses all its copies.

    onnx-graphsurgeon exports every constant a subgraph's nodes use as an initializer of that
    subgraph, even when it lived in an enclosing graph: a weight used by both branches of an If
    is written twice (silero-vad grew by 27 %). Names are unique across scopes, so initializers
    with the same name are copies of one tensor; one copy in the common enclosing graph serves all.
    """
    graphs = dict(_graphs_with_paths(root))
    where: dict[str, list[tuple]] = {}
    for path, g in graphs.items():
        for t in g.initializer:
            where.setdefault(t.name, []).append(path)
    moves = {name: paths for name, paths in where.items() if len(paths) > 1}
    if not moves:
        return
    remove: dict[tuple, set] = {}
    for name, paths in moves.items():
        common = paths[0]
        for p in paths[1:]:
            n = 0
            while n < min(len(common), len(p)) and common[n] == p[n]:
                n += 1
            common = common[:n]
        if common not in paths:
            source = next(t for t in graphs[paths[0]].initializer if t.name == name)
            graphs[common].initializer.append(source)
        for p in paths:
            if p != common:
                remove.setdefault(p, set()).add(name)
    for p, names in remove.items():
        stored = graphs[p].initializer
        for index in reversed(range(len(stored))):  # in place: the others are not copied
            if stored[index].name in names:
                del stored[index]
