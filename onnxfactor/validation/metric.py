"""A task metric of the user's: how often the compressed model gives the original's *answer*.

Relative L2 error and top-1 agreement say little about a detector or an OCR engine (a detector's
overall error hides collapsing class scores; one flipped character changes a recognised line).
``--metric file.py[:function]`` (default function ``score``) names a Python function that judges
the answer itself::

    def score(original: dict[str, np.ndarray], compressed: dict[str, np.ndarray]) -> float | np.ndarray:
        ...

It is called once per batch of the held-out data with both models' outputs (output name ->
array) and returns either one score per sample (a 1-D array of the batch's length) or one score
for the whole batch (weighted by its sample count). Scores are "higher is better, 1.0 = the same
answer"; the reported figure is their mean over all samples. A score that is not finite counts
as 0.0: a comparison that cannot be made never reads as agreement. In Python any callable with
that signature may be given instead of a path (a module-level function when it must travel to
search workers).

Where it counts: ``validate`` and ``compress`` report it and warn below 0.9 (as for top-1
agreement); ``onnxfactor search --min-agreement`` applies to it instead of top-1 agreement;
fine-tuning's held-out figures show it. ``tools/metrics/`` holds the ones used for NudeNet
(detections matched by class and IoU) and PP-OCR recognition (CTC-decoded text equality).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from onnxfactor.data.script import import_script, parse_script, script_error
from onnxfactor.errors import UsageError

DEFAULT_FUNCTION = "score"


class TaskMetric:
    """A loaded ``--metric``; picklable (a path spec is re-imported on the other side)."""

    def __init__(self, spec: str | Callable, *, flag: str = "--metric"):
        self.flag = flag
        if callable(spec):
            self.spec = spec
            self.name = getattr(spec, "__name__", type(spec).__name__)
            self._fn = spec
            return
        text = str(spec)
        parsed = parse_script(text, default=DEFAULT_FUNCTION)
        if parsed is None:
            raise UsageError(f"{flag} takes a Python file FILE.py[:FUNCTION], got {text!r}")
        path, function = parsed
        path = path.resolve()
        if not path.is_file():
            raise UsageError(f"{flag} script {str(path)!r} does not exist")
        self.spec = f"{path}:{function}"
        self.name = f"{path.name}:{function}"
        self._fn = None
        self._path, self._function = path, function
        self._load()  # fail now, in one line, rather than after a long compression

    def __getstate__(self):
        state = dict(self.__dict__)
        if isinstance(self.spec, str):
            state["_fn"] = None
        return state

    def _load(self) -> Callable:
        if self._fn is None:
            module = import_script(self._path, self._path.name, self.flag, kind="metric script")
            fn = getattr(module, self._function, None)
            if not callable(fn):
                raise UsageError(f"metric script {self._path.name} has no function {self._function!r} "
                                 f"(name one with {self.flag} {self._path.name}:FUNCTION)")
            self._fn = fn
        return self._fn

    def scores(self, original: dict[str, np.ndarray], compressed: dict[str, np.ndarray], size: int) -> np.ndarray:
        """Per-sample scores of one batch of ``size`` samples (non-finite -> 0.0)."""
        fn = self._load()
        try:
            value = fn(original, compressed)
        except (KeyboardInterrupt, UsageError):
            raise
        except BaseException as e:  # noqa: BLE001 - user code may raise anything
            raise UsageError(f"metric {self.name} failed: {script_error(e)} (fix the function given to {self.flag})") from None
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise UsageError(f"metric {self.name} returned {type(value).__name__}, not a number or an array of "
                             f"per-sample scores ({self.flag})") from None
        if arr.ndim == 0:
            arr = np.full(size, float(arr))
        elif arr.shape != (size,):
            raise UsageError(f"metric {self.name} returned an array of shape {arr.shape} for a batch of {size} "
                             f"samples; return one score per sample or one for the batch ({self.flag})")
        return np.where(np.isfinite(arr), arr, 0.0)


def as_metric(spec: str | Path | Callable | TaskMetric | None, *, flag: str = "--metric") -> TaskMetric | None:
    """``spec`` as a :class:`TaskMetric` (None stays None)."""
    if spec is None or isinstance(spec, TaskMetric):
        return spec
    return TaskMetric(spec if callable(spec) else str(spec), flag=flag)


class MetricAccumulator:
    """The mean of a metric's per-sample scores, fed one batch pair at a time."""

    def __init__(self, metric: TaskMetric):
        self.metric = metric
        self.total = 0.0
        self.count = 0

    def add(self, original: dict[str, np.ndarray], compressed: dict[str, np.ndarray], size: int) -> None:
        s = self.metric.scores(original, compressed, size)
        self.total += float(s.sum())
        self.count += s.size

    def result(self) -> float | None:
        return None if self.count == 0 else self.total / self.count
