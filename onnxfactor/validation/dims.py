"""Does the model run at the input shapes assumed for its dynamic dims? If not, which value does it need?

Dynamic dims without ``--input-shape`` become 1 (axis 0) and 224 (other axes). Some models do not
run there: a watermark encoder's ``data: [batch_size, wmBits]`` is added to a 32-wide tensor, and
224 fails ONNX Runtime's broadcast ("... by a dimension other than 1. 32 by 224"). Before the
long part of a run, :func:`fit_dynamic_dims` runs the model once on random inputs at the assumed
shapes. When that fails, every number ONNX Runtime's message names (other than the defaults) is
tried for each defaulted dim, one at a time, which is exactly the value a broadcast, concatenation
or reshape against a fixed dim asks for; the first that runs is used and said so. When none does,
a one-line :class:`~onnxfactor.errors.UsageError` names the inputs, the dims assumed and the
``--input-shape`` that sets them.
"""

from __future__ import annotations

import re

import onnx

from onnxfactor.data.signature import declared_dims, real_inputs
from onnxfactor.errors import UsageError

from .inputs import DEFAULT_DYNAMIC_DIM_BATCH, DEFAULT_DYNAMIC_DIM_OTHER, make_inputs

_SOURCE_PATH = re.compile(r"/\S+\.(?:h|cc|cpp):\d+\s+")


def _dim_names(model: onnx.ModelProto) -> dict[str, list[str | None]]:
    out = {}
    for value in real_inputs(model):
        if value.type.WhichOneof("value") == "tensor_type" and value.type.tensor_type.HasField("shape"):
            out[value.name] = [d.dim_param or None for d in value.type.tensor_type.shape.dim]
    return out


def _run_error(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """ONNX Runtime's message when the model fails on random inputs of ``shapes``, else None."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # the failure is reported by us, in one line
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - a model ONNX Runtime cannot load is the loader's to report (exit 4)
        return None
    try:
        session.run(None, make_inputs(model, shapes=shapes).batches[0])
    except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own types
        return str(e)
    return None


def short_message(error: str) -> str:
    """The informative part of an ONNX Runtime error: its status message, without source paths."""
    text = error.split("Status Message:", 1)[-1] if "Status Message:" in error else error
    text = _SOURCE_PATH.sub("", text.strip().splitlines()[0] if text.strip() else error)
    text = re.sub(r"void \S+\([^)]*\)\s*", "", text)
    return text.strip()[:300]


def _fmt(shapes: dict[str, tuple[int, ...]]) -> str:
    return " ".join(f"{n}={'x'.join(map(str, s))}" for n, s in shapes.items())


def fit_dynamic_dims(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                     overrides: dict[str, tuple[int, ...]] | None) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """``(shapes, notes)``: ``shapes`` (from :func:`resolve_input_shapes`) if the model runs at them,
    else with one defaulted dim changed to a value it runs at (a note says which), see the module
    docstring. ``model`` must be runnable as is. Raises :class:`UsageError` when no such value is
    found; the pipeline raises it only where a run needs the shapes (measurements, random-input
    validation), so ``--no-measure --no-validate`` still compresses such a model.
    """
    overrides = overrides or {}
    defaulted = {}
    for value in real_inputs(model):
        declared = declared_dims(value)
        if value.name in overrides or value.name not in shapes or declared is None:
            continue
        axes = [axis for axis, d in enumerate(declared) if d is None]
        if axes:
            defaulted[value.name] = axes
    if not defaulted:
        return shapes, []
    error = _run_error(model, shapes)
    if error is None:
        return shapes, []
    message = short_message(error)
    names = _dim_names(model)
    candidates = [int(n) for n in dict.fromkeys(re.findall(r"(?<![\w.])(\d+)(?![\w.])", message))]
    # the fixed dims a broadcast or reshape names first; 1 (which broadcasts with anything) last
    candidates = [n for n in candidates if 1 < n <= 1 << 16 and n != DEFAULT_DYNAMIC_DIM_OTHER] + [1]
    for value in candidates:
        for name, axes in defaulted.items():
            for axis in axes:
                if axis == 0 and value == DEFAULT_DYNAMIC_DIM_BATCH:
                    continue
                trial = dict(shapes)
                dims = list(trial[name])
                dims[axis] = value
                trial[name] = tuple(dims)
                if _run_error(model, trial) is None:
                    label = names.get(name, [None] * len(dims))[axis] or f"axis {axis}"
                    return trial, [f"input {name!r} dim {label} set to {value}: the model does not run at the default "
                                   f"{shapes[name][axis]} (ONNX Runtime: {message}); --input-shape {name}=... chooses another"]
    dims = "; ".join(f"{n} {[names.get(n, [None] * 99)[a] or f'axis {a}' for a in axes]}" for n, axes in defaulted.items())
    raise UsageError(
        f"the model does not run at the assumed input shapes {_fmt(shapes)} (dynamic dims {dims} set to "
        f"{DEFAULT_DYNAMIC_DIM_BATCH} on axis 0, {DEFAULT_DYNAMIC_DIM_OTHER} elsewhere): ONNX Runtime: {message}; "
        f"set them with --input-shape, e.g. --input-shape {next(iter(defaulted))}=" + "x".join(map(str, shapes[next(iter(defaulted))]))
    )
