"""Validation in ONNX Runtime: providers and sessions, inputs, and the comparison of two models.

``onnxruntime`` is imported only when a session or the provider list is needed, so importing this
package works without it (the ``[cpu]`` / ``[gpu]`` extras install it).
"""

from __future__ import annotations

from .compare import (
    LatencyStats,
    OutputComparison,
    ValidationResult,
    compare_outputs,
    measure_latency,
    run_batches,
    validate,
)
from .inputs import (
    DEFAULT_DYNAMIC_DIM_BATCH,
    DEFAULT_DYNAMIC_DIM_OTHER,
    InputSet,
    make_inputs,
    parse_input_shapes,
    resolve_input_shapes,
)
from .metric import TaskMetric
from .providers import available_providers, make_session, ort_conflict_warning, resolve_providers

__all__ = [
    "DEFAULT_DYNAMIC_DIM_BATCH",
    "DEFAULT_DYNAMIC_DIM_OTHER",
    "InputSet",
    "LatencyStats",
    "OutputComparison",
    "TaskMetric",
    "ValidationResult",
    "available_providers",
    "compare_outputs",
    "make_inputs",
    "make_session",
    "measure_latency",
    "ort_conflict_warning",
    "parse_input_shapes",
    "resolve_input_shapes",
    "resolve_providers",
    "run_batches",
    "validate",
]
