"""ONNX -> PyTorch for fine-tuning: an interpreter of the ONNX graph with torch ops.

Decision (README, "Fine-tuning"): not onnx2torch. Its 1.5.15 release imports torchvision at import
time (for its NMS / RoiAlign converters), and PyPI's torchvision does not load beside the CPU build
of torch 2.13 this project installs; it also fails on ``auto_pad=SAME_UPPER``, on weights held in
``Constant`` nodes and on opset-22 Conv/pool schemas, and it turns a weight shared by two nodes
into two parameters. This module runs the graph node by node with torch functions instead:

* every initializer is one tensor keyed by its ONNX name, so a weight shared by several nodes is
  one parameter (tied by construction) and trained values go back by name (:mod:`.writeback`);
* geometry comes from the same code as the rewrite (``auto_pad`` resolved with
  :func:`onnxfactor.calibration.tiles.explicit_pads`, asymmetric pads by ``F.pad``);
* the ops are those CNNs, detectors and OCR models use (:data:`OPS`); anything else, and any
  ``If``/``Loop``/``Scan``, raises :class:`ConversionError`, which the pipeline turns into the
  fallback (layer-wise reconstruction) with the reason in the report.

Before any training the module is checked against ONNX Runtime on calibration inputs
(:func:`check_against_ort`: <= 1e-4 relative L2 on every output). Shape computations (``Shape``,
``Gather`` on shapes, ``Range`` ...) run on int64 tensors, eagerly.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

from onnxfactor.methods.base import ConvGeometry


class ConversionError(Exception):
    """The model uses something this interpreter does not run (the reason is the message)."""


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _ints(t) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _conv(torch, node, inputs, attrs, opset):
    F = torch.nn.functional
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
    geometry = ConvGeometry.from_attrs({k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}, tuple(w.shape))
    from onnxfactor.calibration.tiles import explicit_pads

    begin, end = explicit_pads(geometry, tuple(x.shape[2:]))
    if any(begin) or any(end):
        x = F.pad(x, [p for pair in zip(reversed(begin), reversed(end)) for p in pair])
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
    return [conv(x, w, b, stride=geometry.strides, dilation=geometry.dilations, groups=geometry.group)]


def _conv_transpose(torch, node, inputs, attrs, opset):
    F = torch.nn.functional
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
    nd = w.dim() - 2
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or "output_shape" in attrs:
        raise ConversionError(f"ConvTranspose {node.name!r} with auto_pad or output_shape")
    strides = attrs.get("strides", [1] * nd)
    dilations = attrs.get("dilations", [1] * nd)
    pads = attrs.get("pads", [0] * 2 * nd)
    extra = attrs.get("output_padding", [0] * nd)
    conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
    y = conv(x, w, b, stride=strides, output_padding=extra, dilation=dilations, groups=attrs.get("group", 1))
    index = [slice(None), slice(None)] + [slice(pads[i], y.shape[2 + i] - pads[nd + i]) for i in range(nd)]
    return [y[tuple(index)]]


def _pool(torch, node, inputs, attrs, opset, kind):
    F = torch.nn.functional
    x = inputs[0]
    kernel = attrs["kernel_shape"]
    nd = len(kernel)
    strides = attrs.get("strides", [1] * nd)
    geometry = ConvGeometry.from_attrs({**{k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}, "strides": strides},
                                       (1, 1, *kernel))
    from onnxfactor.calibration.tiles import explicit_pads

    begin, end = explicit_pads(geometry, tuple(x.shape[2:]))
    ceil = bool(attrs.get("ceil_mode", 0))
    if kind == "max":
        if attrs.get("storage_order", 0) or len(node.output) > 1:
            raise ConversionError(f"MaxPool {node.name!r} with indices")
        if any(begin) or any(end):
            x = F.pad(x, [p for pair in zip(reversed(begin), reversed(end)) for p in pair], value=-math.inf)
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
        return [pool(x, kernel, strides, 0, dilation=attrs.get("dilations", [1] * nd), ceil_mode=ceil)]
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    include = bool(attrs.get("count_include_pad", 0))
    if begin == end and all(2 * p <= k for p, k in zip(begin, kernel)):
        return [pool(x, kernel, strides, begin, ceil_mode=ceil, count_include_pad=include)]
    if not include and (any(begin) or any(end)):
        raise ConversionError(f"AveragePool {node.name!r} with asymmetric pads excluded from the count")
    x = F.pad(x, [p for pair in zip(reversed(begin), reversed(end)) for p in pair])
    return [pool(x, kernel, strides, 0, ceil_mode=ceil)]


def _softmax(torch, node, inputs, attrs, opset, fn="softmax"):
    x = inputs[0]
    axis = attrs.get("axis", -1 if opset >= 13 else 1)
    f = torch.softmax if fn == "softmax" else torch.log_softmax
    if opset >= 13:
        return [f(x, dim=axis)]
    axis = axis % x.dim()  # opset < 13: over the flattened trailing dims
    shape = x.shape
    return [f(x.reshape(int(np.prod(shape[:axis])), -1), dim=1).reshape(shape)]


def _gemm(torch, node, inputs, attrs, opset):
    a, b = inputs[0], inputs[1]
    if attrs.get("transA", 0):
        a = a.t()
    if attrs.get("transB", 0):
        b = b.t()
    y = attrs.get("alpha", 1.0) * (a @ b)
    if len(inputs) > 2 and inputs[2] is not None:
        y = y + attrs.get("beta", 1.0) * inputs[2]
    return [y]


def _reshape(torch, node, inputs, attrs, opset):
    x, shape = inputs[0], _ints(inputs[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x.reshape(shape)]


def _axes(inputs, attrs, index=1):
    if "axes" in attrs:
        return list(attrs["axes"])
    if len(inputs) > index and inputs[index] is not None:
        return _ints(inputs[index])
    return None


def _slice(torch, node, inputs, attrs, opset):
    x = inputs[0]
    if opset < 10:
        starts, ends, axes, steps = attrs["starts"], attrs["ends"], attrs.get("axes"), None
    else:
        starts, ends = _ints(inputs[1]), _ints(inputs[2])
        axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
        steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        a %= x.dim()
        size = x.shape[a]
        if st < 0:
            raise ConversionError(f"Slice {node.name!r} with a negative step")
        s = max(0, min(size, s + size if s < 0 else s))
        e = max(0, min(size, e + size if e < 0 else e))
        index[a] = slice(s, e, st)
    return [x[tuple(index)]]


def _split(torch, node, inputs, attrs, opset):
    x = inputs[0]
    axis = attrs.get("axis", 0)
    split = attrs.get("split")
    if split is None and len(inputs) > 1 and inputs[1] is not None:
        split = _ints(inputs[1])
    if split is None:
        n = attrs.get("num_outputs", len(node.output))
        size = x.shape[axis]
        per = -(-size // n)
        split = [per] * (n - 1) + [size - per * (n - 1)]
    return list(torch.split(x, list(split), dim=axis))


def _resize(torch, node, inputs, attrs, opset):
    F = torch.nn.functional
    x = inputs[0]
    mode = attrs.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    ctm = attrs.get("coordinate_transformation_mode", b"half_pixel" if opset >= 11 else b"asymmetric")
    ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
    scales = sizes = None
    if opset < 11:
        scales = inputs[1]
    else:
        if len(inputs) > 2 and inputs[2] is not None and inputs[2].numel():
            scales = inputs[2]
        if len(inputs) > 3 and inputs[3] is not None and inputs[3].numel():
            sizes = _ints(inputs[3])
    if sizes is not None:
        out = sizes[2:]
    else:
        s = [float(v) for v in scales.reshape(-1).tolist()]
        if s[:2] != [1.0, 1.0]:
            raise ConversionError(f"Resize {node.name!r} of the batch or channel axis")
        out = [int(math.floor(d * f)) for d, f in zip(x.shape[2:], s[2:])]
    if mode == "nearest":
        nearest = attrs.get("nearest_mode", b"round_prefer_floor")
        nearest = nearest.decode() if isinstance(nearest, bytes) else nearest
        if ctm == "asymmetric" and nearest == "floor" or opset < 11:
            return [F.interpolate(x, size=out, mode="nearest")]
        if ctm in ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn") and nearest in ("round_prefer_ceil", "round_prefer_floor"):
            ratios_integral = all(o % d == 0 for o, d in zip(out, x.shape[2:]))
            if ratios_integral:  # integer upsampling: every rule picks the same source pixel
                return [F.interpolate(x, size=out, mode="nearest")]
        raise ConversionError(f"Resize {node.name!r}: nearest with {ctm}/{nearest}")
    if mode == "linear":
        linear = {1: "linear", 2: "bilinear", 3: "trilinear"}[x.dim() - 2]
        if ctm in ("half_pixel", "pytorch_half_pixel"):
            return [F.interpolate(x, size=out, mode=linear, align_corners=False)]
        if ctm == "align_corners":
            return [F.interpolate(x, size=out, mode=linear, align_corners=True)]
    raise ConversionError(f"Resize {node.name!r}: mode {mode} with {ctm}")


def _cast(torch, node, inputs, attrs, opset):
    dtype = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32,
             onnx.TensorProto.BOOL: torch.bool, onnx.TensorProto.FLOAT16: torch.float32, onnx.TensorProto.DOUBLE: torch.float32}
    to = attrs["to"]
    if to not in dtype:
        raise ConversionError(f"Cast {node.name!r} to {onnx.TensorProto.DataType.Name(to)}")
    return [inputs[0].to(dtype[to])]


def _reduce(torch, node, inputs, attrs, opset, fn):
    x = inputs[0]
    axes = _axes(inputs, attrs)
    keep = bool(attrs.get("keepdims", 1))
    if axes is None:
        axes = list(range(x.dim())) if not attrs.get("noop_with_empty_axes", 0) else []
    if not axes:
        return [x]
    return [getattr(torch, fn)(x, dim=axes, keepdim=keep)]


def _div(torch, a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _constant(torch, node, inputs, attrs, opset):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in attrs:
            value = attrs[key]
            array = numpy_helper.to_array(value) if key == "value" else np.asarray(value)
            return [_tensor(torch, array)]
    raise ConversionError(f"Constant {node.name!r} of an unsupported kind")


def _tensor(torch, array: np.ndarray):
    array = np.asarray(array)
    if array.dtype in (np.float16, np.float64):
        array = array.astype(np.float32)
    if array.dtype == np.int32:
        array = array.astype(np.int64)
    return torch.from_numpy(np.array(array, copy=True))  # writable: torch does not share read-only memory


def _unary(fn):
    return lambda torch, node, inputs, attrs, opset: [fn(torch, inputs[0], attrs)]


def _binary(fn):
    return lambda torch, node, inputs, attrs, opset: [fn(torch, inputs[0], inputs[1])]


#: op type -> fn(torch, node, inputs, attrs, opset) -> outputs
OPS = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "MaxPool": lambda t, n, i, a, o: _pool(t, n, i, a, o, "max"),
    "AveragePool": lambda t, n, i, a, o: _pool(t, n, i, a, o, "avg"),
    "GlobalAveragePool": _unary(lambda t, x, a: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)),
    "GlobalMaxPool": _unary(lambda t, x, a: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)),
    "Relu": _unary(lambda t, x, a: t.relu(x)),
    "LeakyRelu": _unary(lambda t, x, a: t.nn.functional.leaky_relu(x, a.get("alpha", 0.01))),
    "Sigmoid": _unary(lambda t, x, a: t.sigmoid(x)),
    "Tanh": _unary(lambda t, x, a: t.tanh(x)),
    "HardSigmoid": _unary(lambda t, x, a: t.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0, 1)),
    "HardSwish": _unary(lambda t, x, a: x * t.clamp(x / 6 + 0.5, 0, 1)),
    "Exp": _unary(lambda t, x, a: t.exp(x)),
    "Log": _unary(lambda t, x, a: t.log(x)),
    "Neg": _unary(lambda t, x, a: -x),
    "Abs": _unary(lambda t, x, a: x.abs()),
    "Sqrt": _unary(lambda t, x, a: t.sqrt(x)),
    "Erf": _unary(lambda t, x, a: t.erf(x)),
    "Identity": _unary(lambda t, x, a: x),
    "Dropout": lambda t, n, i, a, o: [i[0]] + ([t.ones_like(i[0], dtype=t.bool)] if len(n.output) > 1 else []),
    "Flatten": _unary(lambda t, x, a: x.reshape(int(np.prod(x.shape[: a.get("axis", 1) % max(x.dim(), 1)])) if x.dim() else 1, -1)),
    "Transpose": _unary(lambda t, x, a: x.permute(*a.get("perm", list(reversed(range(x.dim())))))),
    "Add": _binary(lambda t, a, b: a + b),
    "Sub": _binary(lambda t, a, b: a - b),
    "Mul": _binary(lambda t, a, b: a * b),
    "Div": _binary(_div),
    "Pow": _binary(lambda t, a, b: t.pow(a, b)),
    "MatMul": _binary(lambda t, a, b: a @ b),
    "Equal": _binary(lambda t, a, b: a == b),
    "Greater": _binary(lambda t, a, b: a > b),
    "Less": _binary(lambda t, a, b: a < b),
    "Max": lambda t, n, i, a, o: [i[0] if len(i) == 1 else t.stack(t.broadcast_tensors(*i)).amax(0)],
    "Min": lambda t, n, i, a, o: [i[0] if len(i) == 1 else t.stack(t.broadcast_tensors(*i)).amin(0)],
    "Where": lambda t, n, i, a, o: [t.where(i[0].bool(), i[1], i[2])],
    "Gemm": _gemm,
    "Softmax": _softmax,
    "LogSoftmax": lambda t, n, i, a, o: _softmax(t, n, i, a, o, "log_softmax"),
    "Clip": lambda t, n, i, a, o: [t.clamp(i[0], min=(float(i[1]) if len(i) > 1 and i[1] is not None else a.get("min")),
                                           max=(float(i[2]) if len(i) > 2 and i[2] is not None else a.get("max")))],
    "BatchNormalization": lambda t, n, i, a, o: [
        (i[0] - i[3].reshape(1, -1, *[1] * (i[0].dim() - 2))) / t.sqrt(i[4].reshape(1, -1, *[1] * (i[0].dim() - 2)) + a.get("epsilon", 1e-5))
        * i[1].reshape(1, -1, *[1] * (i[0].dim() - 2)) + i[2].reshape(1, -1, *[1] * (i[0].dim() - 2))],
    "Reshape": _reshape,
    "Squeeze": lambda t, n, i, a, o: [i[0].squeeze() if _axes(i, a) is None else i[0].squeeze(tuple(_axes(i, a)))],
    "Unsqueeze": lambda t, n, i, a, o: [_unsqueeze(i[0], _axes(i, a))],
    "Concat": lambda t, n, i, a, o: [t.cat([x for x in i if x is not None and x.numel() or x.dim() > 1], dim=a["axis"])],
    "Split": _split,
    "Slice": _slice,
    "Gather": lambda t, n, i, a, o: [_gather(t, i[0], i[1], a.get("axis", 0))],
    "Shape": lambda t, n, i, a, o: [t.tensor(list(i[0].shape)[a.get("start", 0) : a.get("end", None)], dtype=t.int64)],
    "Cast": _cast,
    "Constant": _constant,
    "ConstantOfShape": lambda t, n, i, a, o: [t.full(_ints(i[0]), float(numpy_helper.to_array(a["value"]).reshape(-1)[0]) if "value" in a else 0.0,
                                                    dtype=t.float32 if "value" not in a or numpy_helper.to_array(a["value"]).dtype.kind == "f" else t.int64)],
    "Expand": lambda t, n, i, a, o: [i[0] * t.ones(t.broadcast_shapes(tuple(i[0].shape), tuple(_ints(i[1]))), dtype=i[0].dtype)],
    "Range": lambda t, n, i, a, o: [t.arange(i[0].item(), i[1].item(), i[2].item(), dtype=i[0].dtype)],
    "Resize": _resize,
    "ReduceMean": lambda t, n, i, a, o: _reduce(t, n, i, a, o, "mean"),
    "ReduceSum": lambda t, n, i, a, o: _reduce(t, n, i, a, o, "sum"),
    "ReduceMax": lambda t, n, i, a, o: _reduce(t, n, i, a, o, "amax"),
}


def _gather(torch, x, indices, axis):
    axis %= x.dim()
    flat = torch.index_select(x, axis, indices.reshape(-1).long() % x.shape[axis])
    return flat.reshape(tuple(x.shape[:axis]) + tuple(indices.shape) + tuple(x.shape[axis + 1 :]))


def _unsqueeze(x, axes):
    out = x
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        out = out.unsqueeze(a)
    return out


def supported(model: onnx.ModelProto) -> str | None:
    """Why the interpreter cannot run ``model`` (an op it lacks, a subgraph), or None."""
    for node in model.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return f"node {node.name!r} ({node.op_type}) holds a subgraph"
        if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
            return f"op {node.domain + '.' if node.domain else ''}{node.op_type} (node {node.name!r}) is not supported by the converter"
    return None


def convert(model: onnx.ModelProto, trainable: set[str], device: str = "cpu"):
    """A ``torch.nn.Module`` running ``model``: :class:`GraphModule` (see the module docstring).

    ``trainable`` initializer names become parameters, the other initializers frozen buffers.
    Raises :class:`ConversionError` when :func:`supported` says no.
    """
    reason = supported(model)
    if reason is not None:
        raise ConversionError(reason)
    return _module_class()(model, trainable, device)


_CLASS = None


def _module_class():
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    import torch

    class GraphModule(torch.nn.Module):
        """The ONNX graph as a module: ``forward(feeds, extra=())`` -> {name: tensor} of the graph
        outputs and of the tensors named in ``extra`` (e.g. the decomposed layers' outputs)."""

        def __init__(self, model: onnx.ModelProto, trainable: set[str], device: str):
            super().__init__()
            self.graph = model.graph
            self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
            self.names = {}  # parameter attribute -> initializer name
            self.params = torch.nn.ParameterDict()
            self.frozen = {}
            for init in model.graph.initializer:
                value = _tensor(torch, numpy_helper.to_array(init)).to(device)
                if init.name in trainable and value.is_floating_point():
                    key = f"p{len(self.names)}"
                    self.names[key] = init.name
                    self.params[key] = torch.nn.Parameter(value)
                else:
                    self.frozen[init.name] = value
            self.by_name = {name: key for key, name in self.names.items()}
            self.outputs = [o.name for o in model.graph.output]
            self.device = device

        def tensor(self, name: str):
            key = self.by_name.get(name)
            return self.params[key] if key is not None else self.frozen[name]

        def forward(self, feeds: dict, extra=()):
            env = {name: self.tensor(name) for name in (*self.frozen, *self.by_name)}
            for name, value in feeds.items():
                env[name] = value if isinstance(value, torch.Tensor) else _tensor(torch, value).to(self.device)
            for node in self.graph.node:
                inputs = [env[n] if n else None for n in node.input]
                outs = OPS[node.op_type](torch, node, inputs, _attrs(node), self.opset)
                for name, value in zip(node.output, outs):
                    if name:
                        env[name] = value
            return {name: env[name] for name in (*self.outputs, *extra)}

        def trained(self) -> dict[str, np.ndarray]:
            """Initializer name -> the trained values, for every parameter."""
            return {self.names[k]: p.detach().cpu().numpy() for k, p in self.params.items()}

    _CLASS = GraphModule
    return _CLASS


def check_against_ort(module, model: onnx.ModelProto, batches, *, tolerance: float = 1e-4) -> float:
    """The worst relative L2 error of ``module``'s outputs against ONNX Runtime's on ``batches`` (feed
    dicts; the reference norm at least ``1e-2`` RMS); raises :class:`ConversionError` above ``tolerance``."""
    import torch

    from onnxfactor.validation.providers import make_session

    session = make_session(model, ["CPUExecutionProvider"], spinning=False)  # takes turns with torch
    names = [o.name for o in session.get_outputs()]
    worst = 0.0
    with torch.no_grad():
        for feeds in batches:
            expected = dict(zip(names, session.run(names, feeds)))
            got = module(feeds)
            for name in names:
                a = np.asarray(expected[name], dtype=np.float64)
                b = got[name].detach().cpu().numpy().astype(np.float64)
                if a.shape != b.shape:
                    raise ConversionError(f"output {name!r} has shape {b.shape} in torch, {a.shape} in ONNX Runtime")
                # relative L2, against an RMS of at least 1e-2: probabilities near 0 (a sigmoid on
                # random inputs) differ by float32 rounding only, yet relatively by 1e-2
                norm = max(float(np.linalg.norm(a)), 1e-2 * math.sqrt(max(a.size, 1)))
                err = float(np.linalg.norm(a - b) / norm)
                worst = max(worst, err)
    if not worst <= tolerance:
        raise ConversionError(f"the converted model does not reproduce ONNX Runtime: relative L2 {worst:.3g} > {tolerance:g}")
    return worst
