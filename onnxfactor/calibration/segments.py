"""Cuts through a model's node order: run only what lies after a cut, from its cached tensors.

The sequential correction (:mod:`onnxfactor.calibration.correct`) works through the network in
topological order. Pass ``k`` needs the compressed network's tensors at its layers, with every
earlier pass already fixed, and the original's outputs at the same layers; each end-to-end check
of pass ``k`` differs from the last checked network only at pass ``k``'s layers. Running every one
of them from the model's inputs re-ran the fixed front of the network again and again (NudeNet
320n, 8 passes and 63 checks: 4.5 runs of the whole network over the 128 cached samples per pass
on average). A :class:`Frontier` keeps, for each cached feed dict, the values of the tensors that
cross a cut (:func:`crossing`) and moves forward as passes finish; every run starts from it (a
:class:`~onnxfactor.calibration.probe.Probe` with ``sources``), so the front of the network runs
about once over the whole correction.

Only where it saves work without changing a result: a cut is a set of tensors that every path from
the inputs to what is fetched goes through, so a run from it computes the same nodes on the same
values (tested equal to a run from the inputs). A frontier whose values would exceed its memory
budget stays where it is, which is always correct, only slower.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxfactor.calibration.probe import Probe, _subgraph_reads


def crossing(graph: onnx.GraphProto, position: int) -> list[str]:
    """The tensors that cross the cut before node ``position`` of ``graph``: graph inputs (not
    initializers) and outputs of earlier nodes that a node at or after ``position`` reads (its
    subgraphs' reads included) or that are graph outputs. In graph-input, then node, order."""
    constants = {t.name for t in graph.initializer}
    before = [v.name for v in graph.input if v.name not in constants]
    for node in graph.node[:position]:
        before.extend(o for o in node.output if o)
    read = {o.name for o in graph.output}
    for node in graph.node[position:]:
        read.update(node.input)
        read |= _subgraph_reads(node)
    return [name for name in dict.fromkeys(before) if name in read]


class Frontier:
    """The values of a cut's crossing tensors on each of a list of feed dicts, moved forward on demand.

    It starts at the graph's inputs (the feed dicts themselves). :meth:`advance` computes the
    crossing tensors of a later cut of a model from the current ones, replacing them dict by dict;
    it stays where it is when they would take more than ``budget`` bytes (estimated from the first
    dict) or are not all arrays. ``budget=0`` never moves: every run starts at the inputs. The
    models run from a frontier must agree with the one it was advanced on up to the cut (the same
    nodes computing the same tensors); what lies after it may differ.
    """

    def __init__(self, feeds: list[dict], budget: float):
        self.values = [dict(f) for f in feeds]
        self.names = list(self.values[0]) if self.values else []
        self.budget = float(budget)
        self.at_inputs = True
        self.moves = 0

    @property
    def nbytes(self) -> int:
        return 0 if self.at_inputs else int(sum(np.asarray(v).nbytes for d in self.values for v in d.values()))

    def probe(self, model: onnx.ModelProto, names: list[str], providers: list[str]) -> Probe:
        """A probe of ``names`` in ``model`` that starts at this frontier (its runs take :attr:`values`)."""
        if self.at_inputs or not self.values:
            return Probe(model, names, providers, prune=True, spinning=False)
        return Probe(model, names, providers, spinning=False, sources={n: self.values[0][n] for n in self.names})

    def run(self, model: onnx.ModelProto, names: list[str], providers: list[str]):
        """``names`` in ``model`` for each feed dict, in order (a generator: one dict's tensors at a time)."""
        probe = self.probe(model, names, providers)
        for values in self.values:
            yield probe.run(values)

    def advance(self, model: onnx.ModelProto, position: int, providers: list[str], budget: float | None = None) -> bool:
        """Move to the cut before node ``position`` of ``model``; False when it stays where it is.
        ``budget`` (bytes) replaces the frontier's own for this move."""
        names = crossing(model.graph, position)
        if not self.values or not names:
            return False
        if names == self.names:
            return True
        probe = self.probe(model, names, providers)
        first = probe.run(self.values[0])
        if not all(isinstance(first[n], np.ndarray) for n in names):
            return False
        if sum(first[n].nbytes for n in names) * len(self.values) > (self.budget if budget is None else budget):
            return False
        self.values[0] = {n: first[n] for n in names}
        for i in range(1, len(self.values)):
            out = probe.run(self.values[i])
            self.values[i] = {n: out[n] for n in names}
        self.names, self.at_inputs = names, False
        self.moves += 1
        return True
