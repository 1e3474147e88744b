"""An ``.npz`` file as a :class:`FeedSource`.

Rules
-----
One array per real graph input, keyed by the input name; the first axis of each array is the
sample axis and arrays are split along it into batches. Exceptions, fed unchanged in every batch:
0-d arrays (e.g. silero-vad's ``sr``), and the arrays whose names are listed in an optional
``__broadcast__`` entry (a 1-D string array, e.g. a recurrent state). The batch size is the
model's fixed axis-0 dimension of the split inputs when there is one (e.g. 1), else
``batch_size``; with a fixed batch dimension, samples that do not fill a last batch are dropped
(logged). An optional ``labels`` (or ``label``, ``y``) entry, one integer class per sample (or a
one-hot / score row per sample, reduced by argmax), enables accuracy; a key that names a graph
input is always an input, never labels. Other keys are ignored (logged). Arrays are cast to the
input's element type batch by batch; every batch passes :func:`onnxfactor.data.checks.check_feeds`
(NaN and infinities are found before the first batch is yielded, with the first bad sample's index).
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from onnxfactor.errors import UsageError

from .checks import BROADCAST_KEY, LABEL_KEYS, broadcast_names, check_feeds, check_sample_counts, labels_array
from .signature import InputSignature, check_fits
from .source import Batch, FeedSource

log = logging.getLogger(__name__)


def load_npz(path: Path, flag: str = "--data") -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` archive; :class:`UsageError` naming ``flag`` when it cannot be read."""
    if not path.is_file():
        raise UsageError(f"{flag} file {str(path)!r} does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UsageError(f"{flag} file {str(path)!r} is not a readable .npz archive ({e}); save it with numpy.savez") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise UsageError(f"{flag} file {str(path)!r} holds a single array, not an .npz archive; save it with numpy.savez")
    try:
        return {key: loaded[key] for key in loaded.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UsageError(f"{flag} file {str(path)!r} has an unreadable array ({e}); save it with numpy.savez") from None
    finally:
        loaded.close()


class NpzSource(FeedSource):
    """The arrays of one ``.npz`` file, split into batches along axis 0 (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        inputs: list[InputSignature],
        *,
        max_samples: int | None = None,
        batch_size: int = 64,
        flag: str = "--data",
    ):
        self.path = Path(path)
        self.inputs = inputs
        name = self.path.name
        arrays = load_npz(self.path, flag)
        names = [i.name for i in inputs]
        missing = [n for n in names if n not in arrays]
        if missing:
            raise UsageError(
                f"{flag} {name} has no array for input(s) {', '.join(missing)}; "
                f"npz keys: {', '.join(arrays) or '(none)'}; model inputs: {', '.join(names)}"
            )
        broadcast = broadcast_names(arrays[BROADCAST_KEY], names, name) if BROADCAST_KEY in arrays else frozenset()
        label_key = next((k for k in LABEL_KEYS if k in arrays and k not in names), None)
        unused = sorted(set(arrays) - set(names) - {BROADCAST_KEY, label_key})
        if unused:
            log.info("%s: arrays not used: %s", name, ", ".join(unused))

        self._fixed: dict[str, np.ndarray] = {}
        self._split: dict[str, np.ndarray] = {}
        batch_dims: dict[str, int] = {}
        for spec in inputs:
            array = arrays[spec.name]
            if array.dtype.kind not in "fiub":
                raise UsageError(f"array {spec.name!r} in {name} has dtype {array.dtype}; expected numbers for a {spec.dtype} input")
            what = f"array {spec.name!r} of shape {tuple(array.shape)} in {name}"
            if array.ndim == 0 or spec.name in broadcast:
                check_fits(spec.value, spec.declared, tuple(array.shape), what=what)
                self._fixed[spec.name] = array
                continue
            # Axis 0 counts samples, so it is checked against the batch dim below, not here.
            check_fits(spec.value, spec.declared, tuple(array.shape), what=what, skip_axis0=True)
            self._split[spec.name] = array  # cast batch by batch, after max_samples
            if spec.batch_dim is not None:
                batch_dims[spec.name] = spec.batch_dim
        self.broadcast = frozenset(self._fixed)
        self.label_key = label_key
        labels = None if label_key is None else labels_array(arrays[label_key], label_key, name)

        counts = {n: len(a) for n, a in self._split.items()}
        if labels is not None:
            counts[label_key] = len(labels)
        check_sample_counts(counts, name)
        if len(set(batch_dims.values())) > 1:
            raise UsageError(
                "inputs have different fixed batch dimensions: "
                + ", ".join(f"{k} {v}" for k, v in batch_dims.items())
                + f"; list the ones fed whole in every batch under {BROADCAST_KEY!r} in {name}"
            )

        if not self._split:
            # Nothing per sample: one run with the arrays as they are.
            if labels is not None and len(labels) != 1:
                raise UsageError(f"{name} has {len(labels)} labels but no per-sample input array")
            self._total, self._step, self._labels = 1, 1, labels
        else:
            total = next(iter(counts.values()))
            if max_samples is not None:
                total = min(total, max_samples)
            step = next(iter(batch_dims.values())) if batch_dims else batch_size
            if batch_dims:
                usable = total - total % step
                if usable == 0:
                    raise UsageError(f"{name} has {total} samples, fewer than the model's fixed batch dimension {step}")
                if usable < total:
                    log.warning("%s: dropping the last %d samples, which do not fill a batch of %d", name, total - usable, step)
                total = usable
            if total == 0:
                raise UsageError(f"{name} has no samples (axis 0 of its arrays is 0)")
            self._total, self._step = total, step
            self._labels = None if labels is None else labels[:total]
        self._check_all()

    def _check_all(self) -> None:
        """Every batch once, before any is yielded: a NaN in the last sample fails before the first run."""
        for _ in self.batches():
            pass

    @property
    def describe(self) -> str:
        return f"{self.path.name} ({self._total} sample{'s' if self._total != 1 else ''})"

    @property
    def samples(self) -> int:
        return self._total

    @property
    def labels(self) -> np.ndarray | None:
        """All labels (one per sample), or None."""
        return self._labels

    @property
    def paths(self) -> frozenset[Path]:
        return frozenset({self.path.resolve()})

    def batches(self) -> Iterator[Batch]:
        if not self._split:
            yield check_feeds(dict(self._fixed), self.inputs, source=self.path.name, start=0, labels=self._labels,
                              broadcast=self.broadcast, labels_key=self.label_key or "labels")
            return
        for start in range(0, self._total, self._step):
            stop = min(start + self._step, self._total)
            arrays = {n: self._split[n][start:stop] if n in self._split else self._fixed[n] for n in (i.name for i in self.inputs)}
            labels = None if self._labels is None else self._labels[start:stop]
            yield check_feeds(arrays, self.inputs, source=self.path.name, start=start, labels=labels,
                              broadcast=self.broadcast, labels_key=self.label_key or "labels")
