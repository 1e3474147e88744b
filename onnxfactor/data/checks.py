"""The checks every batch of every source passes before it is fed: keys, dtypes, values, shapes, labels.

:func:`check_feeds` is the one place these rules live; each source calls it on each batch it yields:

* every real model input has an array, and no key is neither an input nor ``labels`` (or
  ``__broadcast__``, the list of arrays fed whole in every batch);
* arrays hold numbers (float, int, uint or bool), not strings or objects;
* float arrays hold no NaN or infinity (the error names the first bad sample's global index), and
  stay finite after the cast to the input's type (e.g. float64 -> float16 overflow);
* arrays for integer inputs hold integers within the input type's range (float data is accepted
  when integral-valued), arrays for bool inputs only 0 and 1;
* rank and every fixed dimension fit the declared shape (axis 0 of a per-sample array is the batch);
* per-sample arrays (rank >= 1, not listed in ``__broadcast__``) agree on axis 0;
* labels hold one integer class per sample (or one-hot / score rows, reduced by argmax).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from onnxfactor.errors import UsageError

from .signature import InputSignature, check_fits

LABELS_KEY = "labels"
LABEL_KEYS = ("labels", "label", "y")  # accepted in .npz files
BROADCAST_KEY = "__broadcast__"


def labels_array(raw: Any, key: str, source: str) -> np.ndarray:
    """One int64 class per sample; a 2-D array of one-hot rows or scores is reduced by argmax."""
    raw = labels = np.asarray(raw)
    if labels.ndim == 2:
        labels = labels.argmax(axis=1) if labels.shape[1] > 1 else labels[:, 0]
    integral = labels.dtype.kind in "iub" or (labels.dtype.kind == "f" and bool(np.all(labels == np.round(labels))))
    if labels.ndim != 1 or not integral:
        raise UsageError(
            f"{key!r} in {source} must hold one integer class per sample (or one-hot rows), "
            f"got dtype {raw.dtype} and shape {tuple(raw.shape)}"
        )
    return labels.astype(np.int64)


def broadcast_names(raw: Any, names: Sequence[str], source: str) -> frozenset[str]:
    """The input names listed in a ``__broadcast__`` entry; :class:`UsageError` for a name that is no input."""
    listed = frozenset(str(name) for name in np.atleast_1d(np.asarray(raw)).tolist())
    stray = sorted(listed - set(names))
    if stray:
        raise UsageError(
            f"{BROADCAST_KEY} in {source} lists {', '.join(stray)}, which are not model inputs: {', '.join(names)}"
        )
    return listed


def split_feed_dict(
    raw: Any, inputs: Sequence[InputSignature], *, source: str, index: int, fix: str
) -> tuple[dict[str, Any], Any, frozenset[str]]:
    """Split one feed dict of a script or iterable into (input arrays, raw labels or None, broadcast names).

    ``index`` is the batch's position in its source, ``fix`` the flag or step named in errors.
    Raises :class:`UsageError` for a non-mapping, a missing input or a key that is neither an input
    nor ``labels`` / ``__broadcast__``.
    """
    names = [i.name for i in inputs]
    if not isinstance(raw, Mapping):
        raise UsageError(
            f"batch {index} of {source} is a {type(raw).__name__}, not a dict of input name -> array; "
            f"model inputs: {', '.join(names)} (fix {fix})"
        )
    keys = [str(k) for k in raw]
    missing = [n for n in names if n not in raw]
    extra = [k for k in keys if k not in names and k not in (LABELS_KEY, BROADCAST_KEY)]
    if missing or extra:
        what = (f"has no array for input(s) {', '.join(missing)}" if missing else
                f"has key(s) {', '.join(map(repr, extra))}, which are neither model inputs nor {LABELS_KEY!r}")
        raise UsageError(
            f"batch {index} of {source} {what}; its keys: {', '.join(keys) or '(none)'}; "
            f"model inputs: {', '.join(names)} (fix {fix})"
        )
    broadcast = broadcast_names(raw[BROADCAST_KEY], names, source) if BROADCAST_KEY in raw and BROADCAST_KEY not in names else frozenset()
    labels = raw[LABELS_KEY] if LABELS_KEY in raw and LABELS_KEY not in names else None
    return {n: raw[n] for n in names}, labels, broadcast


def _bad_sample(mask: np.ndarray, per_sample: bool) -> int | None:
    """The first row of axis 0 holding a True in ``mask`` (per-sample arrays), or 0 for any True (others)."""
    if not mask.any():
        return None
    if not per_sample:
        return 0
    return int(np.argmax(mask.reshape(mask.shape[0], -1).any(axis=1)))


def _check_values(name: str, array: np.ndarray, spec: InputSignature, *, source: str, per_sample: bool, start: int) -> None:
    """NaN / infinity in float data; integral values in range for integer inputs, 0/1 for bool inputs."""
    if array.size == 0:
        return
    target = spec.dtype
    if array.dtype.kind == "f":
        row = _bad_sample(~np.isfinite(array), per_sample)
        if row is not None:
            sample = array[row] if per_sample else array
            bad = "NaN" if np.isnan(sample).any() else "Inf"
            at = f"at sample {start + row}; remove or fix that sample" if per_sample else "(an array fed whole in every batch); fix it"
            raise UsageError(f"array {name!r} in {source} holds {bad} {at}")
    if target.kind == "b":
        row = _bad_sample((array != 0) & (array != 1), per_sample)
        if row is not None:
            at = f"at sample {start + row}" if per_sample else "(fed whole in every batch)"
            raise UsageError(
                f"array {name!r} in {source} holds values other than 0 and 1 {at}, but input {name!r} is bool; "
                f"give booleans or 0/1"
            )
    elif target.kind in "iu":
        if array.dtype.kind == "f":
            row = _bad_sample(array != np.round(array), per_sample)
            if row is not None:
                at = f"at sample {start + row}" if per_sample else "(fed whole in every batch)"
                raise UsageError(
                    f"array {name!r} in {source} holds non-integer values {at}, but input {name!r} is {target}; "
                    f"give integers (class ids, token ids, raw pixels)"
                )
        if array.dtype.kind != "b":
            info = np.iinfo(target)
            low, high = array.min(), array.max()
            if low < info.min or high > info.max:
                raise UsageError(
                    f"array {name!r} in {source} holds values from {low} to {high}, outside the range of input "
                    f"{name!r} of type {target} ({info.min} to {info.max})"
                )


def check_feeds(
    arrays: Mapping[str, Any],
    inputs: Sequence[InputSignature],
    *,
    source: str,
    start: int,
    labels: Any = None,
    broadcast: Collection[str] = (),
    index: int | None = None,
    labels_key: str = LABELS_KEY,
):
    """Check one batch of input arrays (see the module docstring) and return it as a :class:`Batch`.

    Parameters
    ----------
    arrays
        Input name -> array-like, exactly the model's real inputs (see :func:`split_feed_dict`).
    inputs
        The model's real inputs (:func:`onnxfactor.data.signature.signature`).
    source
        How the data is named in messages (``bad.npz``, ``loader.py``).
    start
        Global index of this batch's first sample; errors about a sample name ``start + row``.
    labels
        Raw labels of this batch or None; ``labels_key`` names them in messages.
    broadcast
        Input names fed whole in every batch (their axis 0 is not the sample axis).
    index
        The batch's position in its source, for messages about the whole batch.

    Returns
    -------
    Batch
        Feeds cast to each input's dtype, labels as int64, size, start and the per-sample names.
    """
    from .source import Batch

    where = source if index is None else f"{source} (batch {index})"
    feeds: dict[str, np.ndarray] = {}
    per_sample: dict[str, int] = {}
    for spec in inputs:
        name = spec.name
        raw = arrays[name]
        try:
            array = np.asarray(raw)
        except Exception as e:  # noqa: BLE001 - arbitrary objects raise arbitrary errors
            raise UsageError(f"array {name!r} in {where} is not array-like ({type(raw).__name__}: {e}); give numpy arrays") from None
        if array.dtype.kind not in "fiub":
            raise UsageError(f"array {name!r} in {where} has dtype {array.dtype}; expected numbers for a {spec.dtype} input")
        sampled = array.ndim >= 1 and name not in broadcast
        _check_values(name, array, spec, source=source, per_sample=sampled, start=start)
        check_fits(spec.value, spec.declared, tuple(array.shape), what=f"array {name!r} of shape {tuple(array.shape)} in {where}")
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, with its sample
            cast = array.astype(spec.dtype, copy=False)
        if spec.dtype.kind == "f" and cast is not array and cast.size and not np.isfinite(cast).all():
            row = _bad_sample(~np.isfinite(cast), sampled)
            at = f"at sample {start + row}" if sampled else "(fed whole in every batch)"
            raise UsageError(
                f"array {name!r} in {source} holds values that overflow {spec.dtype} {at}; scale the data to the input's range"
            )
        feeds[name] = cast
        if sampled:
            per_sample[name] = int(array.shape[0])
    counts = dict(per_sample)
    label_array = None
    if labels is not None:
        label_array = labels_array(labels, labels_key, where)
        counts[labels_key] = len(label_array)
    check_sample_counts(counts, where)
    size = next(iter(per_sample.values())) if per_sample else 1
    if label_array is not None and not per_sample and len(label_array) != 1:
        raise UsageError(f"{where} has {len(label_array)} labels but no per-sample input array")
    return Batch(feeds=feeds, labels=label_array, size=size, start=start, per_sample=frozenset(per_sample))


def check_sample_counts(counts: dict[str, int], where: str) -> None:
    """Raise unless every per-sample array (and the labels) of ``where`` has the same length on axis 0."""
    if len(set(counts.values())) > 1:
        raise UsageError(
            f"arrays in {where} disagree on the number of samples (axis 0): "
            + ", ".join(f"{k} {v}" for k, v in counts.items())
            + f"; list arrays fed whole in every batch under {BROADCAST_KEY!r}"
        )
