"""The input shapes that real data implies for a model's dynamic dims.

A model with dynamic dims (``x: [N, 3, H, W]``) is analysed, timed and guarded at concrete shapes.
Without ``--input-shape`` those were 1 on axis 0 and 224 elsewhere (:mod:`onnxfactor.validation.inputs`),
whatever the data: a text detector fed 640 x 640 pages was ranked by MACs, timed layer by layer and
guarded end to end at 224 x 224, and its 640 x 640 latency was never what the selection saw.
:func:`shapes_from_data` takes the dims from the first sample of the data instead: every dynamic
dim but the batch axis (axis 0) gets the value of the first batch's array, axis 0 stays 1 (one
sample: the edge-deployment case, and what the validation's latency times). Fixed dims are the
model's, and an input the user sized with ``--input-shape`` keeps it.

Only data that can be read twice is peeked at: paths (``.npz``, image folders, scripts, which are
re-opened), :class:`~onnxfactor.data.FeedSource` objects and re-iterable Python objects (lists).
A one-shot iterator or a ``CalibrationDataReader`` would lose its first batch to the peek; for
those the defaults (or ``--input-shape``) stay.
"""

from __future__ import annotations

import os
from typing import Any

import onnx

from .iterable import is_reader
from .signature import declared_dims, real_inputs
from .source import FeedSource


def rereadable(data: Any) -> bool:
    """True for data that a peek does not consume (see the module docstring)."""
    if data is None:
        return False
    if isinstance(data, (str, os.PathLike, FeedSource)):
        return True
    if is_reader(data):
        return False
    try:
        return iter(data) is not data
    except TypeError:
        return False


def shapes_from_data(model: onnx.ModelProto, data: Any, *, images=None, role: str = "calibration",
                     given: dict[str, tuple[int, ...]] | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes for the inputs of ``model`` whose dynamic dims ``data``'s first batch fixes.

    Returns only inputs that have a dynamic dim other than axis 0 and are not in ``given``
    (``--input-shape``); each shape is the first batch's with axis 0 set to 1 when the model's
    axis 0 is dynamic. Empty when ``data`` cannot be peeked at (:func:`rereadable`) or has no batch.
    Data errors are raised as :func:`onnxfactor.data.open_source` raises them (one line, exit 2).
    """
    given = given or {}
    declared = {v.name: declared_dims(v) for v in real_inputs(model) if v.type.WhichOneof("value") == "tensor_type"}
    wanted = {n: d for n, d in declared.items()
              if n not in given and d is not None and any(x is None for x in d[1:])}
    if not wanted or not rereadable(data):
        return {}
    from . import open_source

    source = open_source(data, model, images=images, batch_size=1, role=role)  # only the first batch is read
    first = next(iter(source.batches()), None)
    if first is None:
        return {}
    out = {}
    for name, dims in wanted.items():
        array = first.feeds.get(name)
        if array is None or array.ndim != len(dims):
            continue
        shape = tuple(int(s) for s in array.shape)
        out[name] = (1 if dims[0] is None else shape[0], *shape[1:])
    return out


def with_data_shapes(model: onnx.ModelProto, given: dict[str, tuple[int, ...]] | None,
                     sources) -> tuple[dict[str, tuple[int, ...]] | None, str | None]:
    """``(given + the shapes data implies, note)`` from the first of ``sources`` that fixes a dim.

    ``sources`` are ``(data, images, role)`` triples in order of preference (the pipeline puts the
    held-out data first: it is what the validation times, then the calibration data). The note
    says which data set which dims, for the report; ``(given, None)`` when none did.
    """
    for data, images, role in sources:
        found = shapes_from_data(model, data, images=images, role=role, given=given)
        if found:
            text = " ".join(f"{n}={'x'.join(map(str, s))}" for n, s in found.items())
            note = (f"dynamic input dims taken from the first sample of the {role} data: {text} "
                    f"(MACs, timings and random-input checks use them; --input-shape overrides)")
            return {**(given or {}), **found}, note
    return given, None


def shape_sources(calibration=None, images=None, held_out=None) -> list[tuple[Any, Any, str]]:
    """The ``sources`` of :func:`with_data_shapes` for a run: the held-out data (an object with
    ``data`` and ``images``, e.g. :class:`onnxfactor.validation.run.ValidationOptions`) first, then the
    calibration data."""
    out = []
    if held_out is not None and getattr(held_out, "data", None) is not None:
        out.append((held_out.data, held_out.images, "validation"))
    if calibration is not None:
        out.append((calibration, images, "calibration"))
    return out
