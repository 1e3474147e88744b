"""A user's requirements on the searched model, and which of them a measured candidate violates.

Accuracy-like constraints are measured on the held-out data (``--data``): ``max_accuracy_drop``
(top-1 points, needs labels), ``min_agreement`` (agreement with the original: the task metric's
mean score when ``--metric`` is given, else top-1 agreement of the worst classifier-like output),
``max_rel_error`` (the worst output's relative L2 error). Size
constraints are exact counts of the built model: ``max_weight_mb`` (initializer bytes, 10^6),
``max_params``, ``max_macs`` (conv MACs per sample, plus linear layers' when included). Speed:
``target_speedup`` / ``max_latency_ms``, ONNX Runtime end to end, interleaved with the original.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from onnxfactor.errors import UsageError

OBJECTIVES = ("latency", "macs", "params")


@dataclass(frozen=True)
class Constraints:
    max_accuracy_drop: float | None = None
    min_agreement: float | None = None
    max_rel_error: float | None = None
    max_weight_mb: float | None = None
    max_params: int | None = None
    max_macs: int | None = None
    target_speedup: float | None = None
    max_latency_ms: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def measured_speed(self) -> bool:
        return self.target_speedup is not None or self.max_latency_ms is not None

    def caps(self) -> dict[str, float]:
        """The exact caps on the allocation's predicted totals."""
        caps = {}
        if self.max_params is not None:
            caps["params"] = float(self.max_params)
        if self.max_macs is not None:
            caps["macs"] = float(self.max_macs)
        if self.max_weight_mb is not None:
            caps["bytes"] = self.max_weight_mb * 1e6
        return caps


def check_constraints(c: Constraints, *, labels: bool) -> None:
    """One-line :class:`UsageError` for constraints that cannot be judged."""
    if c.max_accuracy_drop is not None and not labels:
        raise UsageError("--max-accuracy-drop needs labels in the held-out data (--data with a 'labels' array); "
                         "use --min-agreement without labels")
    if c.target_speedup is not None and c.max_latency_ms is not None:
        raise UsageError("give one latency requirement: --target-speedup or --max-latency-ms, not both")


def agreement_of(m: dict) -> float | None:
    """What ``min_agreement`` applies to: the task metric when measured, else top-1 agreement."""
    return m["task_metric"] if m.get("task_metric") is not None else m.get("agreement")


def violations(c: Constraints, m: dict) -> list[str]:
    """The requirements measured figures ``m`` (a candidate's result) do not meet, as short phrases."""
    out = []

    def bad(value, limit, above: bool, text: str):
        if limit is None:
            return
        if value is None or value != value or (value > limit if above else value < limit):
            shown = "unknown" if value is None else f"{value:.4g}"
            out.append(f"{text} {shown} ({'>' if above else '<'} {limit:g})")

    drop = None
    if m.get("accuracy_original") is not None and m.get("accuracy") is not None:
        drop = 100.0 * (m["accuracy_original"] - m["accuracy"])
    bad(drop, c.max_accuracy_drop, True, "accuracy drop (points)")
    bad(agreement_of(m), c.min_agreement, False, "task metric" if m.get("task_metric") is not None else "top-1 agreement")
    bad(m.get("rel_error"), c.max_rel_error, True, "relative output error")
    bad(None if m.get("weight_bytes") is None else m["weight_bytes"] / 1e6, c.max_weight_mb, True, "weight MB")
    bad(m.get("params"), c.max_params, True, "parameters")
    bad(m.get("macs"), c.max_macs, True, "MACs")
    bad(m.get("speedup"), c.target_speedup, False, "measured speedup")
    bad(m.get("latency_ms"), c.max_latency_ms, True, "latency ms")
    return out


def objective_value(objective: str, m: dict) -> float:
    """Smaller is better: measured latency, MACs or parameters of a candidate's result.

    Latency is the candidate's median *relative to the original's*, both timed interleaved in the
    candidate's own measurement (``1 / speedup``): candidates are measured one after another on a
    shared machine, so their absolute milliseconds drift between measurements while the ratio does
    not. Without the original's figure, the absolute median (ms)."""
    if objective == "latency" and m.get("latency_ms") is not None and m.get("latency_original_ms"):
        return float(m["latency_ms"]) / float(m["latency_original_ms"])
    key = {"latency": "latency_ms", "macs": "macs", "params": "params"}[objective]
    value = m.get(key)
    return float("inf") if value is None else float(value)
