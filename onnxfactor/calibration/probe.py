"""Run a model in ONNX Runtime with some of its inner tensors exposed as extra graph outputs.

ONNX Runtime's quantization calibrater does the same (``onnxruntime/quantization/calibrate.py``):
it works for any model ONNX Runtime runs, whatever its other ops, and needs no converter. A
tensor that is a graph input is answered from the feeds. An exposed tensor loses the fusion of its
producer with its consumer (Conv + Relu), which changes the values of neither.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxfactor.errors import UsageError, first_line


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from enclosing scopes (a superset)."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for inner in g.node:
                names.update(inner.input)
                names |= _subgraph_reads(inner)
    return names


def needed_nodes(graph: onnx.GraphProto, outputs: list[str], stop: set[str] | frozenset = frozenset()) -> list[int]:
    """Indices of the nodes ``outputs`` depend on, in graph order (ONNX Runtime runs every node of a
    graph whatever outputs are fetched, so a probe of early tensors prunes the rest itself). Tensors
    in ``stop`` are given (:mod:`onnxfactor.calibration.segments`): their producers are not needed."""
    producer = {name: i for i, node in enumerate(graph.node) for name in node.output}
    wanted, stack, seen = set(), list(outputs), set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        i = None if name in stop else producer.get(name)
        if i is None or i in wanted:
            continue
        wanted.add(i)
        node = graph.node[i]
        stack.extend(n for n in node.input if n)
        stack.extend(_subgraph_reads(node))
    return sorted(wanted)


class Probe:
    """A session on a copy of ``model`` whose outputs are ``names`` (with ``prune``: only them).

    ``spinning=False`` for a probe that takes turns with another session or with torch (the
    correction's passes, the distillation's teacher): its idle worker threads then do not spin
    and steal the core the other one runs on (:func:`onnxfactor.validation.providers.make_session`),
    as for the statistics pass, whose runs overlap numpy's work on the previous one (:func:`run_ahead`;
    48 PP-OCRv4 det inputs: 11.9 s without spinning, 16.1 s with it). A probe run back to back keeps
    ONNX Runtime's spinning.

    ``model`` is not modified (it is copied once). :meth:`run` returns name -> array for every
    name in ``names``. ``prune`` keeps only the nodes those tensors depend on.

    ``sources`` (name -> an example array: its dtype and rank) makes a probe that starts at a cut
    through the graph (:mod:`onnxfactor.calibration.segments`): those tensors become its inputs,
    only what lies between them and ``names`` runs (``prune`` implied), and :meth:`run` takes
    their values in the feeds (graph inputs still read after the cut are among them).
    """

    def __init__(self, model: onnx.ModelProto, names: list[str], providers: list[str], *, threads: int | None = None,
                 prune: bool = False, spinning: bool = True, sources: dict[str, np.ndarray] | None = None):
        from onnxfactor.validation.providers import make_session

        sources = dict(sources or {})
        self.inputs = {v.name for v in model.graph.input} | set(sources)
        self.names = list(dict.fromkeys(names))
        self.fetch = [n for n in self.names if n not in self.inputs]
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        self.feed_names = None  # every feed (a whole-model probe)
        if (prune or sources) and self.fetch:
            keep = needed_nodes(probe.graph, self.fetch, stop=frozenset(sources))
            nodes = [probe.graph.node[i] for i in keep]
            del probe.graph.node[:]
            probe.graph.node.extend(nodes)
            del probe.graph.output[:]
            if sources:
                self._start_at(probe, sources)
        present = {o.name for o in probe.graph.output}
        probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in self.fetch if n not in present)
        try:
            self.session = make_session(probe, providers, threads=threads, spinning=spinning)
        except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own types
            raise UsageError(f"ONNX Runtime cannot run the model with its Conv tensors exposed for calibration: {first_line(e)}") from None

    def _start_at(self, probe: onnx.ModelProto, sources: dict[str, np.ndarray]) -> None:
        """Make the cut tensors that the kept nodes read the graph's inputs (the rest are dropped)."""
        reads = {n for node in probe.graph.node for n in node.input} | {n for node in probe.graph.node for n in _subgraph_reads(node)}
        kept = [v for v in probe.graph.input if v.name in reads and v.name not in sources]
        given = []
        for name, example in sources.items():
            if name not in reads:
                continue
            elem = onnx.helper.np_dtype_to_tensor_dtype(np.asarray(example).dtype)
            given.append(onnx.helper.make_tensor_value_info(name, elem, [None] * np.ndim(example)))
        del probe.graph.input[:]
        probe.graph.input.extend(kept + given)
        self.feed_names = [v.name for v in probe.graph.input]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Name -> array of every name in ``names`` on ``feeds``.

        Through OrtValues: the arrays returned share ONNX Runtime's output buffers (each keeps its
        buffer alive) instead of being copies into freshly allocated memory. With 116 Conv tensors
        exposed (318 MB per PP-OCRv4 det input at 992 x 736) ``session.run``'s copies took 205-481
        ms per run against 83-103 ms this way (plain inference 71-80 ms), measured alternately.
        """
        import onnxruntime as ort

        given = feeds if self.feed_names is None else {n: feeds[n] for n in self.feed_names if n in feeds}
        try:
            inputs = {n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for n, v in given.items()}
        except Exception:  # noqa: BLE001 - an input OrtValues do not hold (strings): session.run converts it
            inputs = None
        try:
            values = self.session.run_with_ort_values(self.fetch, inputs) if self.fetch and inputs is not None else []
            if inputs is not None and all(v.is_tensor() for v in values):
                values = [v.numpy() for v in values]
            elif self.fetch:  # a sequence or map output (a check of a model's graph outputs): ONNX Runtime's conversion
                values = self.session.run(self.fetch, given)
        except Exception as e:  # noqa: BLE001
            raise UsageError(
                f"ONNX Runtime failed to run the model on the calibration data: {first_line(e)}; "
                f"check the --calibration inputs (shapes, dtypes, preprocessing)"
            ) from None
        out = dict(zip(self.fetch, values))
        for n in self.names:
            if n in self.inputs:
                out[n] = feeds[n]
        return out


_END = object()


def run_ahead(run, items, overlap: bool = True):
    """Yield ``(item, run(item))`` in order, ``run`` of the next item computing in a worker thread
    while the caller works on the current one.

    ONNX Runtime and numpy release the GIL, so on two cores a pass of probe runs and numpy work
    (the statistics' moments and tiles) takes about the longer of the two instead of their sum
    (the correction's normal equations were tried too and gained nothing measurable: its time is
    in the runs); the caller's own work stays in order on its thread, so its results
    (random draws included) are those of the sequential pass. ``items`` is advanced only once the
    current run has returned, so ``run`` may set state that the iterator reads for the next item.
    At most two runs' results are alive at once. ``overlap=False``: in turn, on the caller's thread.
    """
    from concurrent.futures import ThreadPoolExecutor

    it = iter(items)
    if not overlap:
        for item in it:
            yield item, run(item)
        return
    with ThreadPoolExecutor(1) as pool:
        item = next(it, _END)
        pending = None if item is _END else pool.submit(run, item)
        while item is not _END:
            value = pending.result()
            following = next(it, _END)
            pending = None if following is _END else pool.submit(run, following)
            yield item, value
            del value
            item = following
