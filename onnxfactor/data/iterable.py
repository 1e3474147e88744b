"""Python iterables of feed dicts and ONNX Runtime ``CalibrationDataReader`` s as a :class:`FeedSource`.

Each item is one batch: a dict input name -> array, with an optional ``labels`` entry (one class per
sample) and an optional ``__broadcast__`` entry (names of arrays fed whole, whose axis 0 is not the
sample axis). A ``CalibrationDataReader`` (anything with a callable ``get_next()``) is read by calling
``get_next()`` until it returns None.

One-shot iterables (``iter(obj) is obj``: generators, iterators, readers) cannot be read twice, so
their checked batches are kept in memory as they are first read and replayed on later passes; a
list or any other re-iterable object is iterated anew (and checked again) on every pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from onnxfactor.errors import UsageError, first_line

from .checks import check_feeds, split_feed_dict
from .signature import InputSignature
from .source import Batch, Consistency, FeedSource


def checked_batches(
    items: Iterator[Any], inputs: list[InputSignature], *, source: str, fix: str, failure: Callable[[BaseException, int], str] | None = None
) -> Iterator[Batch]:
    """Check each raw feed dict of ``items`` (see :mod:`onnxfactor.data.checks`) and yield batches.

    ``failure(exc, index)`` words the error when pulling the next item raises (a script's bug); without
    it such exceptions propagate.
    """
    consistency = Consistency(source)
    index = 0
    while True:
        try:
            raw = next(items)
        except StopIteration:
            return
        except (KeyboardInterrupt, UsageError):
            raise
        except BaseException as e:  # noqa: BLE001 - user code may raise anything, SystemExit included
            if failure is None:
                raise
            raise UsageError(failure(e, index)) from None
        arrays, labels, broadcast = split_feed_dict(raw, inputs, source=source, index=index, fix=fix)
        batch = check_feeds(arrays, inputs, source=source, start=consistency.count, labels=labels, broadcast=broadcast, index=index)
        yield consistency.add(batch)
        index += 1


def _reader_items(reader: Any) -> Iterator[Any]:
    while True:
        item = reader.get_next()
        if item is None:
            return
        yield item


def is_reader(obj: Any) -> bool:
    """True for an ONNX Runtime ``CalibrationDataReader`` or anything else with a callable ``get_next``."""
    return callable(getattr(obj, "get_next", None))


class IterableSource(FeedSource):
    """A Python iterable of feed dicts, or a ``CalibrationDataReader`` (see the module docstring)."""

    def __init__(self, obj: Any, inputs: list[InputSignature], *, fix: str = "--data"):
        self.obj = obj
        self.inputs = inputs
        self.fix = fix
        self.reader = is_reader(obj)
        if not self.reader:
            if isinstance(obj, (str, bytes, dict)) or not isinstance(obj, Iterable):
                kind = "a single feed dict: wrap it in a list" if isinstance(obj, dict) else (
                    "not a path, a FeedSource, an iterable of feed dicts or a CalibrationDataReader")
                raise UsageError(f"data of type {type(obj).__name__} is {kind} ({fix})")
        self.one_shot = self.reader or iter(obj) is obj
        self.name = f"{type(obj).__name__} reader" if self.reader else f"{type(obj).__name__} of feed dicts"
        self._samples: int | None = None
        # one-shot objects: the checked batches read so far, whether the object is exhausted, the live pass
        self._cache: list[Batch] = []
        self._done = False
        self._live: Iterator[Batch] | None = None
        self._error: UsageError | None = None

    @property
    def describe(self) -> str:
        return self.name if self._samples is None else f"{self.name} ({self._samples} samples)"

    @property
    def samples(self) -> int | None:
        return self._samples

    def _fresh(self) -> Iterator[Batch]:
        items = _reader_items(self.obj) if self.reader else iter(self.obj)
        return checked_batches(items, self.inputs, source=self.name, fix=self.fix)

    def batches(self) -> Iterator[Batch]:
        if not self.one_shot:
            count = 0
            for batch in self._fresh():
                count += batch.size
                yield batch
            self._samples = count
            return
        yield from self._replay()

    def _replay(self) -> Iterator[Batch]:
        """Cached batches first, then the rest of the one pass the object allows (cached as read)."""
        if self._live is None and not self._done:
            self._live = self._fresh()
        i = 0
        while True:
            if i < len(self._cache):
                yield self._cache[i]
                i += 1
                continue
            if self._done:
                return
            if self._error is not None:  # the object cannot be read past the point it failed at
                if isinstance(self._error, UsageError):
                    raise self._error
                raise UsageError(
                    f"{self.name} raised {type(self._error).__name__}: {first_line(self._error)} after "
                    f"{len(self._cache)} batches on an earlier pass and cannot be read again; pass a list to read it anew"
                )
            try:
                batch = next(self._live)
            except StopIteration:
                self._done, self._live = True, None
                self._samples = sum(b.size for b in self._cache)
                return
            except Exception as e:
                self._error = e
                raise
            self._cache.append(batch)
