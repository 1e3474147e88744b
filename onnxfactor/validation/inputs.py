"""Inputs for validation runs: ``--input-shape`` specs, dynamic dimensions, random or real feeds.

Rules
-----
Real graph inputs
    Graph inputs that are not initializers (from IR 4 on, an input with an initializer is an
    overridable default; ONNX Runtime uses the initializer and it is not fed).
Dynamic dimensions
    A dimension is dynamic when it has a ``dim_param``, no ``dim_value``, or a ``dim_value`` <= 0
    (some exporters write -1 or 0 for "unknown"). Without an override, a dynamic axis 0 becomes
    :data:`DEFAULT_DYNAMIC_DIM_BATCH` and any other dynamic axis :data:`DEFAULT_DYNAMIC_DIM_OTHER`.
Real data
    ``data`` is anything :func:`onnxfactor.data.open_source` takes: an ``.npz`` file keyed by input
    name (:mod:`onnxfactor.data.npz`), a folder of images (:mod:`onnxfactor.data.images`), a
    data-loader script ``file.py[:function]``, a :class:`~onnxfactor.data.FeedSource`, an iterable of
    feed dicts or a ``CalibrationDataReader``. Its batches are read one at a time.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from onnxfactor.data import Batch, FeedSource, ImageSpec, open_source
from onnxfactor.data.signature import check_fits as _check_fits
from onnxfactor.data.signature import declared_dims as _declared_dims
from onnxfactor.data.signature import fmt_dims as _fmt
from onnxfactor.data.signature import np_dtype as _np_dtype
from onnxfactor.data.signature import real_inputs
from onnxfactor.data.source import Consistency
from onnxfactor.errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_DYNAMIC_DIM_BATCH = 1
DEFAULT_DYNAMIC_DIM_OTHER = 224

_SPEC_FORM = "NAME=DIMS, e.g. 'input=1x3x224x224' (positive integers separated by 'x' or ',')"
_DIM_SEPARATORS = re.compile(r"[xX,]")
_FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE})
_INT_TYPES = frozenset(
    {TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
     TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64}
)

__all__ = [
    "DEFAULT_DYNAMIC_DIM_BATCH", "DEFAULT_DYNAMIC_DIM_OTHER", "InputSet", "make_inputs", "parse_input_shapes",
    "real_inputs", "resolve_input_shapes",
]


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


class _ListSource(FeedSource):
    """Feed dicts given directly (random inputs, tests), fed as they are: no checks against a model."""

    def __init__(self, batches: list[dict[str, np.ndarray]], labels: np.ndarray | None, source: str, batch_sizes: list[int] | None):
        self.feeds = list(batches)
        self.labels = labels
        self.source = source
        self.sizes = list(batch_sizes) if batch_sizes is not None else [_rows(b) for b in self.feeds]

    @property
    def describe(self) -> str:
        return self.source

    @property
    def samples(self) -> int:
        return int(sum(self.sizes))

    def batches(self) -> Iterator[Batch]:
        start = 0
        for feeds, size in zip(self.feeds, self.sizes):
            labels = None if self.labels is None else np.asarray(self.labels)[start:start + size]
            per_sample = frozenset(k for k, v in feeds.items() if np.ndim(v) >= 1)
            yield Batch(feeds=feeds, labels=labels, size=int(size), start=start, per_sample=per_sample)
            start += size


def _rows(batch: dict[str, np.ndarray]) -> int:
    """Axis 0 of the batch's first array of rank >= 1, or 1 for a batch of scalars."""
    ranked = [a for a in batch.values() if np.ndim(a) >= 1]
    return int(np.shape(ranked[0])[0]) if ranked else 1


class InputSet:
    """Feeds for validation runs, read batch by batch from a :class:`~onnxfactor.data.FeedSource`.

    Made by :func:`make_inputs`, or directly from a list of feed dicts (one per run, fed unchecked)
    with optional ``labels`` (one entry per sample of the concatenated batches) and ``batch_sizes``
    (when None, read from each batch's first array of rank >= 1, axis 0, or 1 for a batch of scalars).

    :meth:`iter_batches` streams :class:`~onnxfactor.data.Batch` objects; :attr:`first` is the first
    batch's feeds. :attr:`batches` (and iterating the set) holds every batch's feeds in memory at once:
    fine for ``.npz`` data and random inputs, avoid it for a large image folder.
    """

    def __init__(
        self,
        batches: list[dict[str, np.ndarray]] | None = None,
        labels: np.ndarray | None = None,
        source: str | None = None,
        batch_sizes: list[int] | None = None,
        *,
        feeds: FeedSource | None = None,
    ):
        if (batches is None) == (feeds is None):
            raise TypeError("InputSet takes either batches (a list of feed dicts) or feeds (a FeedSource)")
        self.feeds = feeds if feeds is not None else _ListSource(batches, labels, source or "given feeds", batch_sizes)
        self._labels: Any = labels if batches is not None else ...  # ...: not read yet
        self._batches: list[dict[str, np.ndarray]] | None = list(batches) if batches is not None else None

    @property
    def source(self) -> str:
        """What the data is, e.g. ``"data.npz (10 samples)"`` or ``"random (seed 0)"``."""
        return self.feeds.describe

    def iter_batches(self) -> Iterator[Batch]:
        """The batches, one at a time (every call starts over)."""
        return self.feeds.batches()

    @property
    def first(self) -> dict[str, np.ndarray] | None:
        """The first batch's feeds (read without reading the others), None when there is none."""
        if self._batches is not None:
            return self._batches[0] if self._batches else None
        return next((batch.feeds for batch in self.iter_batches()), None)

    @property
    def batches(self) -> list[dict[str, np.ndarray]]:
        """Every batch's feeds, read once and kept (see the class docstring)."""
        if self._batches is None:
            self._batches = [batch.feeds for batch in self.iter_batches()]
        return self._batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def labels(self) -> np.ndarray | None:
        """One int64 class per sample over all batches, or None (read in one pass when not known)."""
        if self._labels is ...:
            known = getattr(self.feeds, "labels", ...)
            if isinstance(known, np.ndarray) or known is None:
                self._labels = known
            else:
                consistency = Consistency(self.source)
                parts = [consistency.add(b).labels for b in self.iter_batches()]
                self._labels = np.concatenate(parts) if parts and parts[0] is not None else None
        return self._labels

    @property
    def samples(self) -> int:
        """The number of samples over all batches (counted in one pass when the source does not know it)."""
        known = self.feeds.samples
        return known if known is not None else sum(b.size for b in self.iter_batches())


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
    data: Any = None,
    images: ImageSpec | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    max_samples: int | None = None,
    batch_size: int = 64,
) -> InputSet:
    """Feeds for every real graph input: random (seeded, one batch) or real data, streamed.

    Random values: standard normal for float16/32/64, integers in [0, 10) for signed and wide
    unsigned integers, [0, 256) for uint8, fair coin flips for bool; shapes from
    :func:`resolve_input_shapes` with ``shapes`` as overrides. ``data`` is anything
    :func:`onnxfactor.data.open_source` takes (opened with ``role="validation"``; ``images``
    preprocesses an image folder); ``shapes`` is then unused: the data carries the shapes.
    Raises :class:`UsageError` for bad options or data.
    """
    if max_samples is not None and max_samples < 1:
        raise UsageError(f"--max-samples must be a positive integer, got {max_samples}")
    if batch_size < 1:
        raise UsageError(f"batch size must be a positive integer, got {batch_size}")
    if data is not None:
        if shapes:
            log.warning("input shapes %s are ignored: the data sets the shapes", shapes)
        source = open_source(data, model, images=images, max_samples=max_samples, batch_size=batch_size, role="validation")
        return InputSet(feeds=source)

    resolved = resolve_input_shapes(model, shapes)
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in real_inputs(model):
        dtype = _np_dtype(value)
        feeds[value.name] = _random_array(rng, value.type.tensor_type.elem_type, dtype, resolved[value.name])
    return InputSet(batches=[feeds], labels=None, source=f"random (seed {seed})")
