"""Network sensitivity (``--sensitivity network``): each layer's options judged by the network's output.

The default sensitivity (:func:`onnxfactor.search.space.sensitivity`) gives each (layer, rank
fraction) the relative error of that layer's *own* output on the calibration data. How much of
it reaches the network's outputs differs from layer to layer (a head conv's error is the output's
error; an early conv's is filtered, or amplified, by everything after it), which the allocation
cannot see. Here, as in AIMET's per-layer compression-ratio selection, every option is instead
judged end to end: the original model with *only that layer* replaced by its chain (the same
data-aware fit, before any correction) runs on calibration samples, and the option's loss is the
square of the network's worst relative output error against the original, per channel
(:func:`onnxfactor.validation.compare.worst_channel_error`: each channel of an ``N x C x ...``
output is judged on its own, so a YOLO head's class scores count beside its pixel-sized box
coordinates; for ``N x C`` classifier outputs it is the plain relative L2). Independent errors at
the outputs add in energy, so the allocation's sum of losses predicts the network's squared
error. Only calibration samples are used (the held-out data stays for the candidates' judgement).

Cost: one compression per (method, fraction) to get the chains (without correction or timing),
then one ONNX Runtime session and one run per sample of the network *after* the layer for every
option: the runs start at the cut before the layer (:mod:`onnxfactor.calibration.segments`, the
original's cut tensors cached and moved forward layer by layer, once per (method, fraction)), so
early layers pay for the whole network and late ones for a little of it. One compressed model and
one spliced copy are held at a time. Options whose chain cannot be spliced back (a linear layer's
when it does not read its input first, a Conv inside a subgraph) keep their layer-output loss
(``network_error`` None).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import onnx

from onnxfactor.search.allocate import Option

#: calibration samples on which each option is judged (``--sensitivity-samples``: the first of the
#: statistics' cached batches that hold at least this many; the summary gives the count)
SAMPLES = 32


def option_key(layer: str, method: str, ranks: dict | None) -> tuple:
    """The identity of an option (as :func:`onnxfactor.search.space._deduplicated` keys them)."""
    return layer, method, repr(sorted((ranks or {}).items()))


def chain_models(model, stats, base, *, methods, fractions, round_to: int, input_shapes=None):
    """Per (method, fraction): the model with every layer decomposed at that fraction (data-aware fit,
    no correction, no timing) and its report (whose rows name each chain's nodes)."""
    from onnxfactor.config import RankConfig
    from onnxfactor.pipeline import compress

    calibration = dataclasses.replace(base.calibration, correct=False, reconstruct_steps=0)
    for method in methods:
        for f in fractions:
            config = dataclasses.replace(base, method=method, latency=None, calibration=calibration,
                                         ranks=RankConfig(policy="ratio", ratio=f, round_to=round_to))
            built, report = compress(model, config=config, calibration=stats, input_shapes=input_shapes)
            yield method, f, built, report


@dataclass(frozen=True)
class _Chain:
    """One chain of a compressed model: its nodes, the initializers they read, the one tensor they
    read (the replaced node's input) and the one they write (its output)."""

    nodes: list
    weights: dict
    input: str
    output: str


def _chains(built: onnx.ModelProto, layers) -> dict:
    """Layer name -> :class:`_Chain` for every report row in ``layers`` whose chain reads one tensor
    and writes one (the maps of ``built`` made once, not per layer)."""
    by_name = {n.name: n for n in built.graph.node}
    weights = {t.name: t for t in built.graph.initializer}
    out = {}
    for layer in layers:
        if not layer.new_nodes or any(n not in by_name for n in layer.new_nodes):
            continue
        nodes = [by_name[n] for n in layer.new_nodes]
        produced = {o for n in nodes for o in n.output if o}
        read = [i for n in nodes for i in n.input if i]
        outputs = [o for o in produced if o not in set(read)]
        inputs = [i for i in dict.fromkeys(read) if i not in produced and i not in weights]
        if len(outputs) == 1 and len(inputs) == 1:
            out[layer.name] = _Chain(nodes, {i: weights[i] for i in read if i in weights}, inputs[0], outputs[0])
    return out


def _replaced(producer: dict, original: onnx.ModelProto, chain: _Chain) -> int | None:
    """The index in ``original`` (``producer``: tensor -> node index) of the node ``chain`` replaced:
    the rewrite keeps its output name and reads its input; None when no single node matches."""
    index = producer.get(chain.output)
    if index is None or not original.graph.node[index].input or original.graph.node[index].input[0] != chain.input:
        return None
    return index


def _spliced(original: onnx.ModelProto, chain: _Chain, index: int) -> onnx.ModelProto:
    """``original`` with node ``index`` swapped for ``chain``; the chain's initializers come along
    (renamed where ``original`` has a tensor of that name: a corrected bias must not overwrite a
    shared one)."""
    from onnxfactor.prepare import copy_model

    out = copy_model(original)
    present = {t.name for t in out.graph.initializer} | {v.name for v in out.graph.input}
    rename = {}
    for name, weight in chain.weights.items():
        new = name if name not in present else f"{name}/onnxfactor_sensitivity"
        rename[name] = new
        tensor = onnx.TensorProto()
        tensor.CopyFrom(weight)
        tensor.name = new
        out.graph.initializer.append(tensor)
        if out.ir_version < 4:  # initializers are graph inputs there
            out.graph.input.append(onnx.helper.make_tensor_value_info(new, tensor.data_type, list(tensor.dims)))
    nodes = []
    for n in chain.nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        for k, name in enumerate(copy.input):
            if name in rename:
                copy.input[k] = rename[name]
        nodes.append(copy)
    kept = list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(kept[:index] + nodes + kept[index + 1:])
    return out


def splice(original: onnx.ModelProto, built: onnx.ModelProto, layer) -> tuple[onnx.ModelProto, int] | None:
    """``original`` with the one node that ``built``'s chain of report row ``layer`` replaced swapped
    for that chain: ``(model, index of the replaced node)``, or None when the chain does not map
    onto one node there."""
    chain = _chains(built, [layer]).get(layer.name)
    producer = {o: k for k, n in enumerate(original.graph.node) for o in n.output}
    index = None if chain is None else _replaced(producer, original, chain)
    return None if index is None else (_spliced(original, chain, index), index)


def _loss(error: float) -> float:
    """The allocation's loss of a network error: its square (a non-finite error: a prohibitive loss)."""
    return error * error if np.isfinite(error) else 1e12


def network_sensitivity(curves: dict[str, list[Option]], rows: list[dict], model, stats, base, *, methods, fractions,
                        round_to: int, input_shapes=None, samples: int = SAMPLES, providers=None, progress=None) -> dict:
    """Replace the losses of ``curves``' options (and add ``network_error`` to ``rows``) by the network's
    squared worst relative output error (per channel) with that option alone applied (module docstring). Returns
    a summary for the report (options judged, samples, seconds)."""
    from onnxfactor.calibration.probe import Probe
    from onnxfactor.calibration.segments import Frontier
    from onnxfactor.prepare import prepare, runnable
    from onnxfactor.validation import resolve_providers
    from onnxfactor.validation.compare import worst_channel_error

    start = time.perf_counter()
    providers = providers or resolve_providers(base.calibration.provider)
    original = runnable(prepare(model, input_shapes, fold_batchnorm=base.fold_batchnorm).loaded)
    feeds, count = [], 0
    for chunk in stats.cache:
        if count >= samples:
            break
        feeds.append(chunk.feeds)
        count += len(chunk.samples)
    summary = {"samples": count, "options": 0, "spliced": 0}
    if not feeds:
        return summary
    names = [o.name for o in original.graph.output]
    reference = Probe(original, names, providers, spinning=False)
    targets = [reference.run(f) for f in feeds]
    wanted = {option_key(o.layer, o.setting["method"], o.setting["ranks"]) for opts in curves.values() for o in opts if o.setting}
    budget = base.calibration.memory_mb * (1 << 20) / 4
    errors: dict[tuple, float] = {}
    # one (method, fraction) model at a time, its layers in graph order, each spliced model built,
    # run from the original's cut before its layer and dropped: memory for one copy of each
    producer = {o: k for k, n in enumerate(original.graph.node) for o in n.output}
    for method, _, built, report in chain_models(model, stats, base, methods=methods, fractions=fractions, round_to=round_to,
                                                 input_shapes=input_shapes):
        keys = {layer.name: option_key(layer.name, method, layer.ranks) for layer in report.decomposed}
        todo = [layer for layer in report.decomposed if keys[layer.name] in wanted and keys[layer.name] not in errors]
        jobs = []
        for name, chain in _chains(built, todo).items():
            index = _replaced(producer, original, chain)
            if index is not None:
                jobs.append((index, keys[name], chain))
        front = Frontier(feeds, budget)
        for index, key, chain in sorted(jobs, key=lambda j: j[0]):
            front.advance(original, index, providers)
            errors[key] = worst_channel_error(targets, list(front.run(_spliced(original, chain, index), names, providers)))
            if progress is not None:
                progress(len(errors), len(wanted), "network sensitivity")
        del built
    for name, options in curves.items():
        rescored = []
        for o in options:
            key = None if o.setting is None else option_key(name, o.setting["method"], o.setting["ranks"])
            rescored.append(dataclasses.replace(o, loss=_loss(errors[key])) if key in errors else o)
        curves[name] = rescored
    for r in rows:
        r["network_error"] = errors.get(option_key(r["layer"], r["method"], r["ranks"]))
    summary.update(options=len(wanted), spliced=len(errors), seconds=round(time.perf_counter() - start, 2),
                   unmeasured=sorted({k[0] for k in wanted if k not in errors}))
    return summary
