"""The one abstraction for model input data: a :class:`FeedSource` yields checked :class:`Batch` es.

Every kind of data (``.npz`` file, image folder, data-loader script, Python iterable, ONNX Runtime
``CalibrationDataReader``) becomes a :class:`FeedSource`; calibration, validation and fine-tuning
read it the same way::

    for batch in source.batches():        # re-iterable: every call starts over, same batches, same order
        session.run(None, batch.feeds)
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxfactor.errors import UsageError

from .signature import InputSignature

log = logging.getLogger(__name__)

#: role -> (the flag that gives the data, the flag that limits its samples)
ROLE_FLAGS = {"calibration": ("--calibration", "--calibration-samples"), "validation": ("--data", "--max-samples")}


def role_flags(role: str) -> tuple[str, str]:
    """The data flag and the sample-count flag of a role (``"calibration"`` or ``"validation"``)."""
    try:
        return ROLE_FLAGS[role]
    except KeyError:
        raise ValueError(f"role must be one of {', '.join(ROLE_FLAGS)}, got {role!r}") from None


@dataclass(frozen=True)
class Batch:
    """One run's feeds, checked and cast, with the labels and the global position of its samples.

    Attributes
    ----------
    feeds
        Every real model input -> array of the input's dtype, ready for ``session.run``.
    labels
        One int64 class per sample, or None.
    size
        Samples in this batch (1 when no feed has a sample axis).
    start
        Global index of the batch's first sample in its source.
    per_sample
        The feeds whose axis 0 is the sample axis (not 0-d arrays, not ``__broadcast__`` arrays).
    """

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None
    size: int
    start: int
    per_sample: frozenset[str]

    def head(self, n: int) -> Batch:
        """The first ``n`` samples of this batch (``n <= size``)."""
        if n >= self.size:
            return self
        feeds = {k: (v[:n] if k in self.per_sample else v) for k, v in self.feeds.items()}
        labels = None if self.labels is None else self.labels[:n]
        return Batch(feeds=feeds, labels=labels, size=n, start=self.start, per_sample=self.per_sample)


class FeedSource(abc.ABC):
    """Input data for a model, as re-iterable batches of checked feeds.

    Subclasses implement :meth:`batches` and :attr:`describe`; :attr:`samples` and :attr:`paths`
    default to "unknown" and "no files".
    """

    @property
    @abc.abstractmethod
    def describe(self) -> str:
        """What the data is, for reports and messages, e.g. ``"calib.npz (1000 samples)"``."""

    @property
    def samples(self) -> int | None:
        """The number of samples when known without iterating (or after one full pass), else None."""
        return None

    @property
    def paths(self) -> frozenset[Path]:
        """Resolved paths of the files this source reads (empty for Python iterables)."""
        return frozenset()

    @property
    def code_paths(self) -> frozenset[Path]:
        """The part of :attr:`paths` that is code, not data (a data-loader script): two sources may share it."""
        return frozenset()

    @abc.abstractmethod
    def batches(self) -> Iterator[Batch]:
        """Yield the batches; every call starts over and yields the same batches in the same order."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe}>"


class Consistency:
    """Checks across the batches of one pass: labels in all batches or in none, consecutive ``start``."""

    def __init__(self, source: str):
        self.source = source
        self.count = 0
        self.batches = 0
        self.labelled: bool | None = None

    def add(self, batch: Batch) -> Batch:
        labelled = batch.labels is not None
        if self.labelled is not None and labelled != self.labelled:
            if self.labelled:
                what = f"earlier batches carry 'labels' but batch {self.batches} does not"
            else:
                what = f"batch {self.batches} carries 'labels' but earlier batches do not"
            raise UsageError(f"{self.source}: {what}; give labels with every batch or with none")
        self.labelled = labelled
        self.count += batch.size
        self.batches += 1
        return batch


class LimitedSource(FeedSource):
    """The first ``max_samples`` samples of another source (its last batch cut, or dropped when a fixed
    batch dimension forbids cutting it)."""

    def __init__(self, inner: FeedSource, max_samples: int, inputs: list[InputSignature] | None = None, *, flag: str = "--max-samples"):
        if max_samples < 1:
            raise UsageError(f"{flag} must be a positive integer, got {max_samples}")
        self.inner = inner
        self.max_samples = max_samples
        self._fixed = any(i.batch_dim is not None for i in (inputs or []))
        self._samples: int | None = None

    @property
    def describe(self) -> str:
        count = self.samples
        return f"{self.inner.describe}, first {count if count is not None else self.max_samples} samples"

    @property
    def samples(self) -> int | None:
        if self._samples is None and self.inner.samples is not None and self.inner.samples <= self.max_samples:
            return self.inner.samples
        return self._samples

    @property
    def paths(self) -> frozenset[Path]:
        return self.inner.paths

    @property
    def code_paths(self) -> frozenset[Path]:
        return self.inner.code_paths

    def batches(self) -> Iterator[Batch]:
        seen = 0
        for batch in self.inner.batches():
            left = self.max_samples - seen
            if batch.size > left:
                if self._fixed:
                    log.warning("%s: dropping a batch of %d samples that does not fit in the first %d", self.inner.describe, batch.size, self.max_samples)
                    break
                batch = batch.head(left)
            seen += batch.size
            yield batch
            if seen >= self.max_samples:
                break
        self._samples = seen
