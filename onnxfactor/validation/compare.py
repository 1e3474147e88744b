"""Compare two models in ONNX Runtime: output errors, top-1 agreement, accuracy, interleaved latency.

Metrics, per output, over all batches taken as one flat vector (computed in float64, batch by batch,
so outputs are never held in memory all at once; the numbers equal those of the concatenation):

* ``max_abs`` = max |a - b|
* ``rel_l2`` = ||a - b|| / max(||a||, tiny), ``a`` being the original's output
* ``cosine`` = a.b / (||a|| ||b||); 1.0 when both are zero, 0.0 when only one is
* ``top1_agreement``: for classifier-like outputs, the fraction of samples whose argmax over axis 1
  is the same in both models; a sample whose scores hold a NaN in either model never agrees (and
  is never correct for accuracy). Classifier-like: a floating-point output of shape ``[N, C]`` with
  C >= 2, or ``[N, C, 1, ...]`` (e.g. ``N x C x 1 x 1``), in every batch.

Non-finite values: a NaN in either output makes ``max_abs`` and ``cosine`` NaN and ``rel_l2``
infinite, so any ``--max-rel-error`` fails. Infinities equal in both models (same position, same
sign, e.g. masked logits) count as agreement and are left out of the norms; any other infinity
makes ``max_abs`` and ``rel_l2`` infinite and ``cosine`` NaN.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from onnxfactor.errors import InputModelError, UsageError, ValidationFailed
# Relative imports within this package: it can be renamed without edits here.
from .inputs import InputSet
from .metric import MetricAccumulator, TaskMetric
from .providers import make_session

log = logging.getLogger(__name__)

_TINY = np.finfo(np.float64).tiny
LATENCY_WARMUP = 5
#: Below this top-1 agreement, or above this relative L2 error of an output, the compressed model
#: is called far from the original (a prominent warning; see :meth:`ValidationResult.far_from_original`).
WARN_TOP1_AGREEMENT = 0.9
WARN_REL_L2 = 0.3


@dataclass(frozen=True)
class OutputComparison:
    """How far one output of the compressed model is from the original's (see the module docstring)."""

    name: str
    max_abs: float
    rel_l2: float
    cosine: float
    top1_agreement: float | None


@dataclass(frozen=True)
class LatencyStats:
    """Wall time of one ``session.run`` on the first batch, in milliseconds, over ``runs`` runs."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int


@dataclass
class ValidationResult:
    """The comparison of a compressed model against its original on the same inputs."""

    outputs: list[OutputComparison]
    samples: int
    input_source: str
    providers: list[str]
    accuracy_original: float | None = None
    accuracy_compressed: float | None = None
    latency_original: LatencyStats | None = None
    latency_compressed: LatencyStats | None = None
    task_metric: float | None = None       # mean score of --metric (onnxfactor.validation.metric)
    task_metric_name: str | None = None
    latency_shapes: dict[str, list[int]] | None = None  # the feeds timed (one sample: :func:`one_sample`)

    @property
    def worst_rel_l2(self) -> float:
        """The largest relative L2 error over the outputs (0.0 for a model without outputs)."""
        return max((o.rel_l2 for o in self.outputs), default=0.0)

    @property
    def speedup(self) -> float | None:
        """Original median latency / compressed median latency; None when latency was not measured."""
        if self.latency_original is None or self.latency_compressed is None or self.latency_compressed.median_ms <= 0:
            return None
        return self.latency_original.median_ms / self.latency_compressed.median_ms

    def passed(self, max_rel_error: float | None) -> bool:
        """True when every output's ``rel_l2`` is <= ``max_rel_error``; always True without a threshold."""
        if max_rel_error is None:
            return True
        if not max_rel_error >= 0:
            raise UsageError(f"--max-rel-error must be a number >= 0, got {max_rel_error!r}")
        return self.worst_rel_l2 <= max_rel_error

    def far_from_original(self) -> str | None:
        """Why the compressed model's outputs are far from the original's (:data:`WARN_TOP1_AGREEMENT`,
        :data:`WARN_REL_L2`), or None. Non-finite errors always count as far."""
        reasons = []
        agreements = [o.top1_agreement for o in self.outputs if o.top1_agreement is not None]
        if agreements and min(agreements) < WARN_TOP1_AGREEMENT:
            reasons.append(f"top-1 agreement {min(agreements):.3f} (< {WARN_TOP1_AGREEMENT:g})")
        if self.task_metric is not None and not self.task_metric >= WARN_TOP1_AGREEMENT:
            reasons.append(f"task metric {self.task_metric_name} {self.task_metric:.3f} (< {WARN_TOP1_AGREEMENT:g})")
        worst = self.worst_rel_l2
        if not worst <= WARN_REL_L2:  # NaN too
            reasons.append(f"worst output relative L2 error {worst:.3g} (> {WARN_REL_L2:g})")
        return " and ".join(reasons) or None

    def to_dict(self) -> dict:
        """Plain values (full-precision floats) plus ``worst_rel_l2`` and ``speedup``.

        Non-finite floats stay floats; ``onnxfactor.report.to_jsonable`` turns them into strings
        for strict JSON.
        """
        out = asdict(self)
        out["worst_rel_l2"] = self.worst_rel_l2
        out["speedup"] = self.speedup
        return out


def _is_classifier_like(array: np.ndarray) -> bool:
    shape = np.shape(array)
    return (
        np.asarray(array).dtype.kind == "f"
        and len(shape) >= 2
        and shape[1] >= 2
        and all(d == 1 for d in shape[2:])
    )


class _OutputAccumulator:
    """Running sums for one output's metrics, fed one batch pair at a time."""

    def __init__(self, name: str):
        self.name = name
        self.max_abs = 0.0
        self.diff2 = 0.0
        self.a2 = 0.0
        self.b2 = 0.0
        self.ab = 0.0
        self.nan = False
        self.inf_mismatch = False
        self.classifier = True
        self.classes: int | None = None
        self.argmax_a: list[np.ndarray] = []
        self.argmax_b: list[np.ndarray] = []

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            raise ValidationFailed(
                f"output {self.name!r} has shape {a.shape} in the original model but {b.shape} in the compressed one"
            )
        self._add_argmax(a, b)
        x = a.astype(np.float64, copy=False).ravel()
        y = b.astype(np.float64, copy=False).ravel()
        if np.isnan(x).any() or np.isnan(y).any():
            self.nan = True
            return
        finite = np.isfinite(x) & np.isfinite(y)
        if not finite.all():
            if not ((x == y) | finite).all():
                self.inf_mismatch = True
                return
            x, y = x[finite], y[finite]  # infinities equal in both: agreement, outside the norms
        if x.size == 0:
            return
        d = x - y
        self.max_abs = max(self.max_abs, float(np.abs(d).max()))
        self.diff2 += float(d @ d)
        self.a2 += float(x @ x)
        self.b2 += float(y @ y)
        self.ab += float(x @ y)

    def _add_argmax(self, a: np.ndarray, b: np.ndarray) -> None:
        if not self.classifier:
            return
        if not _is_classifier_like(a) or (self.classes is not None and a.shape[1] != self.classes):
            self.classifier = False
            self.argmax_a, self.argmax_b = [], []
            return
        self.classes = a.shape[1]
        rows_a, rows_b = a.reshape(a.shape[0], a.shape[1]), b.reshape(b.shape[0], b.shape[1])
        # a row holding NaN has no class: argmax would say 0 on both sides and count as agreement
        nan_a, nan_b = np.isnan(rows_a).any(axis=1), np.isnan(rows_b).any(axis=1)
        self.argmax_a.append(np.where(nan_a, -1, rows_a.argmax(axis=1)))
        self.argmax_b.append(np.where(nan_b | nan_a, -2, rows_b.argmax(axis=1)))

    def predictions(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Argmax over axis 1 per sample for both models, or None when the output is not classifier-like."""
        if not self.classifier or not self.argmax_a:
            return None
        return np.concatenate(self.argmax_a), np.concatenate(self.argmax_b)

    def result(self) -> OutputComparison:
        preds = self.predictions()
        top1 = None if preds is None or preds[0].size == 0 else float(np.mean(preds[0] == preds[1]))
        if self.nan:
            return OutputComparison(self.name, float("nan"), float("inf"), float("nan"), top1)
        if self.inf_mismatch:
            return OutputComparison(self.name, float("inf"), float("inf"), float("nan"), top1)
        norm_a, norm_b = np.sqrt(self.a2), np.sqrt(self.b2)
        rel_l2 = float(np.sqrt(self.diff2) / max(norm_a, _TINY))
        if self.diff2 == 0:
            cosine = 1.0  # identical (also when both are zero), free of rounding in the formula below
        elif norm_a == 0 or norm_b == 0:
            cosine = 0.0
        else:
            cosine = float(np.clip(self.ab / np.sqrt(self.a2 * self.b2), -1.0, 1.0))
        return OutputComparison(self.name, self.max_abs, rel_l2, cosine, top1)


class _Comparison:
    """Accumulators for every output of the original model, in its output order."""

    def __init__(self, names: Sequence[str]):
        self.outputs = {name: _OutputAccumulator(name) for name in names}

    def add(self, original: dict[str, np.ndarray], compressed: dict[str, np.ndarray]) -> None:
        missing = [name for name in self.outputs if name not in compressed]
        if missing:
            raise UsageError(
                f"the compressed model has no output {', '.join(map(repr, missing))}; "
                f"its outputs: {', '.join(compressed) or '(none)'}"
            )
        for name, acc in self.outputs.items():
            acc.add(original[name], compressed[name])

    def results(self) -> list[OutputComparison]:
        return [acc.result() for acc in self.outputs.values()]

    def accuracies(self, labels: np.ndarray | None) -> tuple[float | None, float | None]:
        """Accuracy of both models on the first classifier-like output; (None, None) without one."""
        if labels is None:
            return None, None
        for acc in self.outputs.values():
            preds = acc.predictions()
            if preds is None:
                continue
            if len(preds[0]) != len(labels):
                raise UsageError(
                    f"{len(labels)} labels but output {acc.name!r} has {len(preds[0])} rows; "
                    f"labels must have one entry per sample of the input data"
                )
            return float(np.mean(preds[0] == labels)), float(np.mean(preds[1] == labels))
        log.warning("labels given but no output looks like class scores ([N, C] with C >= 2): accuracy not computed")
        return None, None


def _as_batches(outputs: list[dict[str, np.ndarray]] | dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    return [outputs] if isinstance(outputs, dict) else list(outputs)


def compare_outputs(
    original: list[dict[str, np.ndarray]] | dict[str, np.ndarray],
    compressed: list[dict[str, np.ndarray]] | dict[str, np.ndarray],
) -> list[OutputComparison]:
    """Compare outputs batch by batch, one :class:`OutputComparison` per output of ``original``.

    Each argument is a dict name -> array (one batch) or a list of them (one per batch, aligned).
    See the module docstring for the metrics. Raises :class:`ValidationFailed` when an output's shape
    differs between the models, :class:`UsageError` when the compressed outputs lack a name.
    """
    original, compressed = _as_batches(original), _as_batches(compressed)
    if len(original) != len(compressed):
        raise UsageError(f"{len(original)} batches of original outputs but {len(compressed)} of compressed outputs")
    comparison = _Comparison(original[0] if original else [])
    for a, b in zip(original, compressed):
        comparison.add(a, b)
    return comparison.results()


def worst_channel_error(
    original: list[dict[str, np.ndarray]] | dict[str, np.ndarray],
    compressed: list[dict[str, np.ndarray]] | dict[str, np.ndarray],
) -> float:
    """The worst relative L2 error over ``original``'s outputs and, for outputs of rank >= 3, their channels.

    An ``N x C x ...`` output's channel of axis 1 gets its own relative L2 over the other axes and
    batches; a lower-rank output (``N x C`` logits), or one whose axis 1 differs in size between
    batches (a sequence length), its plain ``rel_l2``. A YOLO head's single
    ``1 x (4 + classes) x anchors`` output holds box coordinates in pixels beside class scores in
    [0, 1]: its plain relative L2 is the boxes' alone (NudeNet 320n with 43 layers decomposed:
    boxes 0.02, class scores 0.68, the whole output 0.02), while the class scores decide the
    answers; per channel, the scores count as much as the coordinates. (The root mean square over
    the channels was tried too: it dilutes NudeNet's 4 box channels among 18 class channels, and
    the search's candidates held fewer layers at the same selection metric.) Infinities equal in
    both models are left out; any other non-finite value: ``inf``.
    """
    original, compressed = _as_batches(original), _as_batches(compressed)
    # channels: axis 1 of outputs of rank >= 3 whose axis 1 has one size in every batch (a
    # sequence length that varies from batch to batch, as PP-OCR rec's time steps, is no channel axis)
    sizes: dict[str, set] = {}
    for batch in original:
        for name, a in batch.items():
            sizes.setdefault(name, set()).add(np.shape(a)[1] if np.ndim(a) >= 3 else None)
    num: dict[str, np.ndarray] = {}
    den: dict[str, np.ndarray] = {}
    for a_batch, b_batch in zip(original, compressed):
        for name, a in a_batch.items():
            a = np.asarray(a, dtype=np.float64)
            b = np.asarray(b_batch[name], dtype=np.float64)
            if a.shape != b.shape or not (np.isfinite(b) | (a == b)).all():
                return float("inf")
            if not np.isfinite(a).all():  # infinities equal in both (masked logits): left out, as in rel_l2
                a, b = np.where(np.isfinite(a), a, 0.0), np.where(np.isfinite(a), b, 0.0)
            per_channel = a.ndim >= 3 and len(sizes[name]) == 1
            axes = (0, *range(2, a.ndim)) if per_channel else None
            num[name] = num.get(name, 0.0) + np.square(a - b).sum(axis=axes)
            den[name] = den.get(name, 0.0) + np.square(a).sum(axis=axes)
    errors = [float(np.sqrt(np.max(num[n] / np.maximum(den[n], _TINY)))) for n in num]  # per channel, then the worst
    return max(errors, default=float("inf"))


def run_batches(session, batches: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Run ``session`` on every feed dict; the outputs of each run as a dict name -> array."""
    names = [output.name for output in session.get_outputs()]
    return [dict(zip(names, session.run(names, feeds))) for feeds in batches]


def _stats(times_s: list[float]) -> LatencyStats:
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    p10, median, p90 = np.percentile(ms, [10, 50, 90])
    return LatencyStats(median_ms=float(median), p10_ms=float(p10), p90_ms=float(p90), runs=len(ms))


def measure_latency(
    sessions: Sequence, feeds: dict[str, np.ndarray], *, runs: int = 50, warmup: int = LATENCY_WARMUP
) -> list[LatencyStats]:
    """Time ``session.run`` for each session on the same feeds, interleaved run by run.

    After ``warmup`` untimed runs each, the sessions take turns (A, B, A, B, ...) so that slow
    phases of a shared machine hit all of them alike; each run is timed with
    ``time.perf_counter``. Returns one :class:`LatencyStats` per session, in order.
    """
    if runs < 1:
        raise UsageError(f"latency runs must be a positive integer, got {runs}")
    if warmup < 0:
        raise UsageError(f"latency warm-up runs must be >= 0, got {warmup}")
    names = [[output.name for output in s.get_outputs()] for s in sessions]
    for _ in range(warmup):
        for session, outs in zip(sessions, names):
            session.run(outs, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for session, outs, record in zip(sessions, names, times):
            start = time.perf_counter()
            session.run(outs, feeds)
            record.append(time.perf_counter() - start)
    return [_stats(t) for t in times]


#: Input bytes per validation run: a batch is run in parts of at most this much input (at least one
#: sample), on inputs whose batch axis is dynamic. ONNX Runtime's activations scale with the run:
#: 64 pages of 640 x 640 through PP-OCRv6 det (both sessions) peaked at 15 GB of RSS.
VALIDATION_RUN_BYTES = 8 << 20


def _dynamic_batch(session) -> set[str]:
    return {i.name for i in session.get_inputs() if i.shape and not isinstance(i.shape[0], int)}


def runs_of(session, batch):
    """``(feeds, samples)`` of the runs ``batch`` is validated in (:data:`VALIDATION_RUN_BYTES`)."""
    split = {k for k in batch.per_sample & _dynamic_batch(session) if k in batch.feeds}
    per_sample = sum(batch.feeds[k].nbytes for k in split) / max(batch.size, 1)
    rows = batch.size if not split or per_sample <= 0 else max(1, int(VALIDATION_RUN_BYTES // per_sample))
    if rows >= batch.size:
        yield batch.feeds, batch.size
        return
    for a in range(0, batch.size, rows):
        b = min(a + rows, batch.size)
        yield {k: (v[a:b] if k in split else v) for k, v in batch.feeds.items()}, b - a


def one_sample(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` cut to their first sample on every input whose batch axis (axis 0) is dynamic.

    Latency is timed at batch 1, the shape the end-to-end guard of ``compress`` timed
    (:mod:`onnxfactor.speed`) and the one edge deployments run; a validation batch of 64 pages
    of 640 x 640 took 5.5 s per run, and 100 of them did not say more.
    """
    dynamic = _dynamic_batch(session)
    return {k: (v[:1] if k in dynamic and getattr(v, "ndim", 0) > 0 and v.shape[0] > 1 else v) for k, v in feeds.items()}


def _label(model) -> str:
    return "model" if isinstance(model, onnx.ModelProto) else str(os.fspath(model))


def _session(model, role: str, providers: list[str], threads: int | None):
    try:
        return make_session(model, providers, threads=threads, measuring=True)
    except (UsageError, InputModelError):
        raise
    except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own exception types
        raise InputModelError(f"ONNX Runtime cannot load the {role} {_label(model)}: {str(e).splitlines()[0]}") from None


def _run(session, feeds: dict[str, np.ndarray], role: str, source: str) -> dict[str, np.ndarray]:
    try:
        return run_batches(session, [feeds])[0]
    except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own exception types
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if role == "original":
            raise UsageError(
                f"ONNX Runtime failed to run the original model on {source}: {message}; "
                f"give real inputs with --data or shapes with --input-shape"
            ) from None
        raise ValidationFailed(f"the compressed model fails on inputs the original accepts ({source}): {message}") from None


def validate(
    original: onnx.ModelProto | str | os.PathLike,
    compressed: onnx.ModelProto | str | os.PathLike,
    *,
    inputs: InputSet,
    providers: list[str],
    threads: int | None = None,
    latency_runs: int = 50,
    metric: TaskMetric | None = None,
) -> ValidationResult:
    """Run both models on ``inputs`` and compare outputs, accuracy (with labels), ``metric`` (a
    :class:`~onnxfactor.validation.metric.TaskMetric`, batch by batch) and latency.

    Sessions are made with ``measuring=True`` and identical options. Batches are read one at a time
    and outputs compared batch by batch (see the module docstring), so a large image folder is never
    held in memory; latency is measured on the first sample of the first batch (:func:`one_sample`) with
    :func:`measure_latency` (``latency_runs=0`` skips it). ``providers`` in the result are the ones
    the original model's session actually uses.
    """
    if latency_runs < 0:
        raise UsageError(f"latency runs must be >= 0, got {latency_runs}")
    session_o = _session(original, "original model", providers, threads)
    session_c = _session(compressed, "compressed model", providers, threads)
    names_o = [o.name for o in session_o.get_outputs()]
    names_c = [o.name for o in session_c.get_outputs()]
    if sorted(names_o) != sorted(names_c):
        raise UsageError(
            f"the models have different outputs: original {', '.join(names_o)}; compressed {', '.join(names_c)}; "
            f"compare a model with its own compressed version"
        )
    comparison = _Comparison(names_o)
    task = None if metric is None else MetricAccumulator(metric)
    # Streamed: only the current batch (run in parts, :func:`runs_of`) and the first one (for the latency runs) are held.
    first = None
    samples = 0
    labels: list[np.ndarray] = []
    for batch in inputs.iter_batches():
        if first is None:
            first = batch.feeds
        for feeds, size in runs_of(session_o, batch):
            out_o, out_c = _run(session_o, feeds, "original", inputs.source), _run(session_c, feeds, "compressed", inputs.source)
            comparison.add(out_o, out_c)
            if task is not None:
                task.add(out_o, out_c, size)
            del out_o, out_c
        samples += batch.size
        if batch.labels is not None:
            labels.append(batch.labels)
    accuracy_o, accuracy_c = comparison.accuracies(np.concatenate(labels) if labels else None)
    latency_o = latency_c = timed = None
    if latency_runs > 0 and first is not None:
        timed = one_sample(session_o, first)
        latency_o, latency_c = measure_latency([session_o, session_c], timed, runs=latency_runs)
    return ValidationResult(
        outputs=comparison.results(),
        samples=samples,
        input_source=inputs.source,
        providers=list(session_o.get_providers()),
        accuracy_original=accuracy_o,
        accuracy_compressed=accuracy_c,
        latency_original=latency_o,
        latency_compressed=latency_c,
        task_metric=None if task is None else task.result(),
        task_metric_name=None if metric is None else metric.name,
        latency_shapes=None if timed is None else {k: list(np.shape(v)) for k, v in timed.items()},
    )
