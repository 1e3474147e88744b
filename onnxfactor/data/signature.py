"""The inputs a model is fed: which graph inputs are real, their element types and declared shapes.

A dimension is dynamic when it has a ``dim_param``, no ``dim_value``, or a ``dim_value`` <= 0 (some
exporters write -1 or 0 for "unknown"); :func:`declared_dims` writes it as None.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxfactor.errors import UsageError


def real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs that must be fed: those without an initializer of the same name."""
    initialised = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initialised]


def declared_dims(value: onnx.ValueInfoProto) -> list[int | None] | None:
    """The declared shape, None for each dynamic dimension; None when the rank is unknown."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim]


def fmt_declared(value: onnx.ValueInfoProto) -> str:
    """``[batch, 3, 224, 224]``: the declared shape as written, ``?`` for an unnamed dynamic dim."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return "(unknown rank)"
    dims = []
    for d in tensor.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(str(d.dim_value))
        else:
            dims.append(d.dim_param or "?")
    return "[" + ", ".join(dims) + "]"


def fmt_dims(dims: Iterable[int]) -> str:
    """``1x3x224x224``; ``(scalar)`` for no dims."""
    return "x".join(str(d) for d in dims) or "(scalar)"


def np_dtype(value: onnx.ValueInfoProto) -> np.dtype:
    """The numpy dtype of a tensor input; :class:`UsageError` for other kinds and unsupported types."""
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        raise UsageError(f"input {value.name!r} is a {kind or 'value of unknown type'}; only tensor inputs can be fed")
    elem = value.type.tensor_type.elem_type
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    except Exception:  # noqa: BLE001 - unknown / undefined element types raise several types
        dtype = None
    if dtype is None or elem == TensorProto.STRING or dtype.kind not in "fiub":
        raise UsageError(
            f"input {value.name!r} has element type {TensorProto.DataType.Name(elem)}, which onnxfactor cannot "
            f"generate or cast to; this type is not supported for validation"
        )
    return dtype


def check_fits(
    value: onnx.ValueInfoProto,
    declared: list[int | None] | None,
    shape: tuple[int, ...],
    *,
    what: str,
    skip_axis0: bool = False,
) -> None:
    """Raise :class:`UsageError` when ``shape`` has another rank or breaks a fixed declared dim."""
    if declared is None:
        return
    if len(shape) != len(declared):
        raise UsageError(
            f"{what} has rank {len(shape)} but input {value.name!r} is declared {fmt_declared(value)} "
            f"(rank {len(declared)})"
        )
    for axis, (got, fixed) in enumerate(zip(shape, declared)):
        if fixed is not None and got != fixed and not (skip_axis0 and axis == 0):
            raise UsageError(
                f"{what} does not fit input {value.name!r} declared {fmt_declared(value)}: "
                f"axis {axis} is fixed at {fixed}, got {got}"
            )


@dataclass(frozen=True)
class InputSignature:
    """One real model input: its value info, numpy dtype and declared dims (None = dynamic)."""

    value: onnx.ValueInfoProto
    dtype: np.dtype
    declared: list[int | None] | None

    @property
    def name(self) -> str:
        return self.value.name

    @property
    def batch_dim(self) -> int | None:
        """The fixed axis-0 dimension, None when it is dynamic or the input has rank 0 / unknown rank."""
        return self.declared[0] if self.declared else None


def signature(model: onnx.ModelProto) -> list[InputSignature]:
    """Every real input of ``model`` in graph order; :class:`UsageError` for one that cannot be fed."""
    return [InputSignature(value, np_dtype(value), declared_dims(value)) for value in real_inputs(model)]
