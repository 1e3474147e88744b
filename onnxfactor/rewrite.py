"""The only module that edits the graph: replace a Conv node by the chain of a :class:`ChainSpec`.

Following onnx-graphsurgeon's "replace a subgraph" recipe: the new nodes take the old node's
input (and bias), the last one writes the old node's output tensor (so every consumer and graph
output is untouched), and the old node is disconnected and removed in place, which keeps the
node order topological. New names derive from the old node's name: ``<node>/<method>_<role>``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxfactor.analysis import ConvSite, iter_graphs
from onnxfactor.methods.base import ChainSpec

# Attributes that describe the geometry of a Conv; pointwise convs of a chain get none of them.
_GEOMETRY_ATTRS = ("auto_pad", "dilations", "pads", "strides")


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
            if conv.carries_geometry:
                attrs = {k: v for k, v in node.attrs.items() if k in _GEOMETRY_ATTRS}
            else:
                attrs = {}
            attrs["kernel_shape"] = [int(k) for k in conv.weight.shape[2:]]
            attrs["group"] = int(conv.group)
            inputs = [x, weight] + ([bias] if conv.takes_bias and bias is not None else [])
            last = index == len(chain.convs) - 1
            out = final_output if last else gs.Variable(self._unique(f"{base}/{chain.method}_{conv.role}_out"), dtype=dtype)
            new_nodes.append(
                gs.Node(op="Conv", name=self._unique(f"{base}/{chain.method}_{conv.role}"), attrs=attrs, inputs=inputs, outputs=[out])
            )
            x = out
        position = graph.nodes.index(node)
        node.inputs.clear()
        node.outputs.clear()
        graph.nodes[position : position + 1] = new_nodes
        return [n.name for n in new_nodes]


def export_model(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export ``graph`` and copy the model-level fields of ``like`` (IR version, opsets, metadata)."""
    model = gs.export_onnx(graph, do_type_check=False)
    _hoist_shared_initializers(model.graph)
    model.ir_version = like.ir_version
    del model.opset_import[:]
    model.opset_import.extend(like.opset_import)
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field, getattr(like, field))
    del model.functions[:]
    model.functions.extend(like.functions)
    return model


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
        keep = [t for t in graphs[p].initializer if t.name not in names]
        del graphs[p].initializer[:]
        graphs[p].initializer.extend(keep)
