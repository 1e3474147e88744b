"""Inputs for validation runs: ``--input-shape`` specs, dynamic dimensions, random or ``.npz`` feeds.

Rules
-----
Real graph inputs
    Graph inputs that are not initializers (from IR 4 on, an input with an initializer is an
    overridable default; ONNX Runtime uses the initializer and it is not fed).
Dynamic dimensions
    A dimension is dynamic when it has a ``dim_param``, no ``dim_value``, or a ``dim_value`` <= 0
    (some exporters write -1 or 0 for "unknown"). Without an override, a dynamic axis 0 becomes
    :data:`DEFAULT_DYNAMIC_DIM_BATCH` and any other dynamic axis :data:`DEFAULT_DYNAMIC_DIM_OTHER`.
``.npz`` data
    One array per real graph input, keyed by the input name; the first axis of each array is the
    sample axis and arrays are split along it into batches. Exceptions, fed unchanged in every
    batch: 0-d arrays (e.g. silero-vad's ``sr``), and the arrays whose names are listed in an
    optional ``__broadcast__`` entry (a 1-D string array, e.g. a recurrent state). The batch size
    is the model's fixed axis-0 dimension of the split inputs when there is one (e.g. 1), else
    ``batch_size``; with a fixed batch dimension, samples that do not fill a last batch are dropped
    (logged). An optional ``labels`` (or ``label``, ``y``) entry, one integer class per sample (or a
    one-hot / score row per sample, reduced by argmax), enables accuracy; a key that names a
    graph input is always an input, never labels. Arrays are cast to the input's element type.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxfactor.errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_DYNAMIC_DIM_BATCH = 1
DEFAULT_DYNAMIC_DIM_OTHER = 224

LABEL_KEYS = ("labels", "label", "y")
BROADCAST_KEY = "__broadcast__"
_SPEC_FORM = "NAME=DIMS, e.g. 'input=1x3x224x224' (positive integers separated by 'x' or ',')"
_DIM_SEPARATORS = re.compile(r"[xX,]")
_FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE})
_INT_TYPES = frozenset(
    {TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
     TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64}
)


def parse_input_shapes(specs: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``--input-shape`` specs ``"name=1x3x224x224"`` into ``{"name": (1, 3, 224, 224)}``.

    The name may itself contain ``=``, ``/`` or ``:``; the spec is split at its last ``=``.
    Raises :class:`UsageError` naming the bad spec and the expected form.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims_text = str(spec).rpartition("=")
        name, dims_text = name.strip(), dims_text.strip()
        if not sep or not name or not dims_text:
            raise UsageError(f"bad --input-shape {spec!r}: expected {_SPEC_FORM}")
        parts = [p.strip() for p in _DIM_SEPARATORS.split(dims_text)]
        if not all(p.isdigit() and int(p) > 0 for p in parts):
            raise UsageError(
                f"bad --input-shape {spec!r}: dimensions {dims_text!r} are not positive integers; expected {_SPEC_FORM}"
            )
        dims = tuple(int(p) for p in parts)
        if name in shapes and shapes[name] != dims:
            raise UsageError(f"--input-shape gives {name!r} twice: {_fmt(shapes[name])} and {_fmt(dims)}")
        shapes[name] = dims
    return shapes


def real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs that must be fed: those without an initializer of the same name."""
    initialised = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initialised]


def _declared_dims(value: onnx.ValueInfoProto) -> list[int | None] | None:
    """The declared shape, None for each dynamic dimension; None when the rank is unknown."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim]


def _fmt_declared(value: onnx.ValueInfoProto) -> str:
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


def _fmt(dims: Iterable[int]) -> str:
    return "x".join(str(d) for d in dims) or "(scalar)"


def resolve_input_shapes(
    model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]] | None = None
) -> dict[str, tuple[int, ...]]:
    """A concrete shape for every real tensor input: the override, else the declared shape with defaults.

    Dynamic dimensions (see the module docstring) become 1 on axis 0 and 224 elsewhere. An override
    must have the declared rank and agree with every fixed dimension. Inputs that are not tensors
    (sequences, maps, optionals) are left out. Raises :class:`UsageError` for an override naming no
    real input, an override that does not fit, or an input of unknown rank without override.
    """
    overrides = dict(overrides or {})
    inputs = real_inputs(model)
    names = [value.name for value in inputs]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise UsageError(
            f"--input-shape names {', '.join(map(repr, unknown))}, which is not a model input; "
            f"inputs: {', '.join(names) or '(none)'}"
        )
    shapes: dict[str, tuple[int, ...]] = {}
    for value in inputs:
        if value.type.WhichOneof("value") != "tensor_type":
            continue
        declared = _declared_dims(value)
        override = overrides.get(value.name)
        if override is not None:
            override = tuple(int(d) for d in override)
            _check_fits(value, declared, override, what=f"--input-shape {value.name}={_fmt(override)}")
            shapes[value.name] = override
        elif declared is None:
            raise UsageError(
                f"input {value.name!r} has no declared shape; set it with --input-shape {value.name}=DIMS"
            )
        else:
            shapes[value.name] = tuple(
                d if d is not None else (DEFAULT_DYNAMIC_DIM_BATCH if axis == 0 else DEFAULT_DYNAMIC_DIM_OTHER)
                for axis, d in enumerate(declared)
            )
    return shapes


def _check_fits(
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
            f"{what} has rank {len(shape)} but input {value.name!r} is declared {_fmt_declared(value)} "
            f"(rank {len(declared)})"
        )
    for axis, (got, fixed) in enumerate(zip(shape, declared)):
        if fixed is not None and got != fixed and not (skip_axis0 and axis == 0):
            raise UsageError(
                f"{what} does not fit input {value.name!r} declared {_fmt_declared(value)}: "
                f"axis {axis} is fixed at {fixed}, got {got}"
            )


@dataclass
class InputSet:
    """Feeds for validation runs, one dict per run, with optional labels for accuracy.

    ``labels`` has one entry per sample of the concatenated batches. ``batch_sizes`` is the number
    of samples in each batch; when None it is read from each batch's first array of rank >= 1
    (axis 0), or 1 for a batch of scalars.
    """

    batches: list[dict[str, np.ndarray]]
    labels: np.ndarray | None
    source: str
    batch_sizes: list[int] | None = None

    @property
    def samples(self) -> int:
        """The number of samples over all batches."""
        if self.batch_sizes is not None:
            return int(sum(self.batch_sizes))
        total = 0
        for batch in self.batches:
            ranked = [a for a in batch.values() if np.ndim(a) >= 1]
            total += int(np.shape(ranked[0])[0]) if ranked else 1
        return total


def _np_dtype(value: onnx.ValueInfoProto) -> np.dtype:
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


def _random_array(rng: np.random.Generator, elem: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if elem in _FLOAT_TYPES:
        return rng.standard_normal(shape).astype(dtype)
    if elem == TensorProto.BOOL:
        return rng.random(shape) < 0.5
    if elem == TensorProto.UINT8:
        return rng.integers(0, 256, size=shape).astype(dtype)
    if elem in _INT_TYPES:
        return rng.integers(0, 10, size=shape).astype(dtype)
    raise UsageError(
        f"cannot generate random values of type {TensorProto.DataType.Name(elem)}; give real inputs with --data"
    )


def make_inputs(
    model: onnx.ModelProto,
    *,
    data: str | os.PathLike | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    max_samples: int | None = None,
    batch_size: int = 64,
) -> InputSet:
    """Feeds for every real graph input: random (seeded, one batch) or read from an ``.npz`` file.

    Random values: standard normal for float16/32/64, integers in [0, 10) for signed and wide
    unsigned integers, [0, 256) for uint8, fair coin flips for bool; shapes from
    :func:`resolve_input_shapes` with ``shapes`` as overrides. For ``data`` see the module
    docstring (``shapes`` is then unused: the arrays carry the shapes). Raises :class:`UsageError`
    for bad options or data.
    """
    if max_samples is not None and max_samples < 1:
        raise UsageError(f"--max-samples must be a positive integer, got {max_samples}")
    if batch_size < 1:
        raise UsageError(f"batch size must be a positive integer, got {batch_size}")
    if data is not None:
        if shapes:
            log.warning("input shapes %s are ignored: the arrays in %s set the shapes", shapes, data)
        return _npz_inputs(model, Path(data), max_samples=max_samples, batch_size=batch_size)

    resolved = resolve_input_shapes(model, shapes)
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in real_inputs(model):
        dtype = _np_dtype(value)
        feeds[value.name] = _random_array(rng, value.type.tensor_type.elem_type, dtype, resolved[value.name])
    return InputSet(batches=[feeds], labels=None, source=f"random (seed {seed})")


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise UsageError(f"--data file {str(path)!r} does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UsageError(f"--data file {str(path)!r} is not a readable .npz archive ({e}); save it with numpy.savez") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise UsageError(f"--data file {str(path)!r} holds a single array, not an .npz archive; save it with numpy.savez")
    try:
        return {key: loaded[key] for key in loaded.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UsageError(f"--data file {str(path)!r} has an unreadable array ({e}); save it with numpy.savez") from None
    finally:
        loaded.close()


def _labels(raw: np.ndarray, key: str, source: str) -> np.ndarray:
    """One integer class per sample; a 2-D array of one-hot rows or scores is reduced by argmax."""
    labels = np.asarray(raw)
    if labels.ndim == 2:
        labels = labels.argmax(axis=1) if labels.shape[1] > 1 else labels[:, 0]
    integral = labels.dtype.kind in "iub" or (labels.dtype.kind == "f" and np.all(labels == np.round(labels)))
    if labels.ndim != 1 or not integral:
        raise UsageError(
            f"{key!r} in {source} must hold one integer class per sample (or one-hot rows), "
            f"got dtype {raw.dtype} and shape {tuple(raw.shape)}"
        )
    return labels.astype(np.int64)


def _npz_inputs(model: onnx.ModelProto, path: Path, *, max_samples: int | None, batch_size: int) -> InputSet:
    arrays = _load_npz(path)
    inputs = real_inputs(model)
    names = [value.name for value in inputs]
    missing = [name for name in names if name not in arrays]
    if missing:
        raise UsageError(
            f"--data {path.name} has no array for input(s) {', '.join(missing)}; "
            f"npz keys: {', '.join(arrays) or '(none)'}; model inputs: {', '.join(names)}"
        )
    broadcast = set()
    if BROADCAST_KEY in arrays:
        broadcast = {str(name) for name in np.atleast_1d(arrays[BROADCAST_KEY]).tolist()}
        stray = sorted(broadcast - set(names))
        if stray:
            raise UsageError(
                f"{BROADCAST_KEY} in {path.name} lists {', '.join(stray)}, which are not model inputs: {', '.join(names)}"
            )
    label_key = next((k for k in LABEL_KEYS if k in arrays and k not in names), None)
    unused = sorted(set(arrays) - set(names) - {BROADCAST_KEY, label_key})
    if unused:
        log.info("%s: arrays not used: %s", path.name, ", ".join(unused))

    fixed_arrays: dict[str, np.ndarray] = {}
    split_arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, np.dtype] = {}
    batch_dims: dict[str, int] = {}
    for value in inputs:
        dtype = dtypes[value.name] = _np_dtype(value)
        array = arrays[value.name]
        if array.dtype.kind not in "fiub":
            raise UsageError(
                f"array {value.name!r} in {path.name} has dtype {array.dtype}; expected numbers for a {dtype} input"
            )
        declared = _declared_dims(value)
        what = f"array {value.name!r} of shape {tuple(array.shape)} in {path.name}"
        if array.ndim == 0 or value.name in broadcast:
            _check_fits(value, declared, tuple(array.shape), what=what)
            fixed_arrays[value.name] = array.astype(dtype, copy=False)
            continue
        # Axis 0 counts samples, so it is checked against the batch dim below, not here.
        _check_fits(value, declared, tuple(array.shape), what=what, skip_axis0=True)
        split_arrays[value.name] = array  # cast batch by batch, after max_samples
        if declared and declared[0] is not None:
            batch_dims[value.name] = declared[0]

    labels = None if label_key is None else _labels(arrays[label_key], label_key, path.name)

    counts = {name: len(a) for name, a in split_arrays.items()}
    if labels is not None:
        counts[label_key] = len(labels)
    if len(set(counts.values())) > 1:
        raise UsageError(
            f"arrays in {path.name} disagree on the number of samples (axis 0): "
            + ", ".join(f"{k} {v}" for k, v in counts.items())
            + f"; list arrays fed whole in every batch under {BROADCAST_KEY!r}"
        )
    if len(set(batch_dims.values())) > 1:
        raise UsageError(
            "inputs have different fixed batch dimensions: "
            + ", ".join(f"{k} {v}" for k, v in batch_dims.items())
            + f"; list the ones fed whole in every batch under {BROADCAST_KEY!r} in {path.name}"
        )

    if not split_arrays:
        # Nothing per sample: one run with the arrays as they are.
        if labels is not None and len(labels) != 1:
            raise UsageError(f"{path.name} has {len(labels)} labels but no per-sample input array")
        source = f"{path.name} (1 sample)"
        return InputSet(batches=[dict(fixed_arrays)], labels=labels, source=source, batch_sizes=[1])

    total = next(iter(counts.values()))
    if max_samples is not None:
        total = min(total, max_samples)
    step = next(iter(batch_dims.values())) if batch_dims else batch_size
    if batch_dims:
        usable = total - total % step
        if usable == 0:
            raise UsageError(f"{path.name} has {total} samples, fewer than the model's fixed batch dimension {step}")
        if usable < total:
            log.warning(
                "%s: dropping the last %d samples, which do not fill a batch of %d", path.name, total - usable, step
            )
        total = usable
    if total == 0:
        raise UsageError(f"{path.name} has no samples (axis 0 of its arrays is 0)")

    batches, sizes = [], []
    for start in range(0, total, step):
        stop = min(start + step, total)
        batches.append({
            name: split_arrays[name][start:stop].astype(dtypes[name], copy=False) if name in split_arrays
            else fixed_arrays[name]
            for name in names
        })
        sizes.append(stop - start)
    if labels is not None:
        labels = labels[:total]
    return InputSet(batches=batches, labels=labels, source=f"{path.name} ({total} samples)", batch_sizes=sizes)
