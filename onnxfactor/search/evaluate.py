"""Building and measuring one candidate: the unit of work of the pool, of Ray and of the cache.

A candidate is a JSON-able ``spec``:

* ``{"kind": "layers", "method": "tucker2", "ranks": {node: ranks | None}}`` -- per-layer ranks
  from the allocation (a rank file, as ``--rank-file`` reads it; nodes not listed are kept);
  with ``"method": "mixed"`` each node's entry names its own method (``{"method": "cp3", "rank": 9}``);
* ``{"kind": "global", "method": ..., "policy": "ratio" | "weakened" | "vbmf" | "error",
  "value": x, "round_to": n}`` -- one global setting of the grid.

:func:`evaluate` builds it with the full pipeline (calibration statistics computed once by the
search and shipped to the workers; data-aware factors; the sequential correction; optionally a
brief fine-tuning), then compares it with the original on the held-out data in ONNX Runtime:
accuracy, top-1 agreement, the task metric (``--metric``), worst relative L2 error, and
interleaved end-to-end latency. The
candidate's layers are chosen by MACs (no per-layer timing inside a candidate), so that the
result depends on the spec alone and the pool, Ray and the cache agree; speed is judged on the
whole model. Figures that are deterministic (everything but latency) are what the tests compare.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from onnxfactor.search.space import MIXED

#: bump when the figures :func:`evaluate` returns change meaning (invalidates caches)
VERSION = 2


@dataclass(frozen=True)
class Context:
    """Everything a worker needs to evaluate specs (picklable; the statistics travel as a file)."""

    model: Path
    base: object                    # CompressConfig: selection, calibration options, include_linear
    held_out: object                # validation.run.ValidationOptions with data
    input_shapes: dict | None = None
    stats_file: Path | None = None  # a pickled CalibrationData
    threads: int | None = 1         # ONNX Runtime intra-op threads of each worker
    latency_runs: int = 30
    finetune: object = None         # FinetuneConfig of the brief fine-tuning of every candidate
    finetune_data: object = None
    identity: dict = field(default_factory=dict)  # what the cache key covers besides the spec


_STATS: dict[Path, object] = {}


def _statistics(ctx: Context):
    if ctx.stats_file is None:
        return None
    if ctx.stats_file not in _STATS:
        import pickle

        with open(ctx.stats_file, "rb") as f:
            _STATS[ctx.stats_file] = pickle.load(f)
    return _STATS[ctx.stats_file]


def spec_key(spec: dict, ctx: Context) -> str:
    """Content hash of a candidate in its context (the cache's file name)."""
    payload = json.dumps({"v": VERSION, "spec": spec, "context": ctx.identity}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def config_for(spec: dict, base, folder: Path):
    """The :class:`~onnxfactor.config.CompressConfig` that builds ``spec`` (a rank file in ``folder``)."""
    from onnxfactor.config import RankConfig

    if spec["kind"] == "layers":
        path = folder / f"ranks-{hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]}.json"
        path.write_text(json.dumps({n: r for n, r in spec["ranks"].items() if r is not None}))
        ranks = RankConfig(policy="file", rank_file=path)
    else:
        value = spec.get("value")
        kwargs = {"ratio": value} if spec["policy"] == "ratio" else {"weaken": value} if spec["policy"] == "weakened" else \
            {"target_error": value} if spec["policy"] == "error" else {}
        ranks = RankConfig(policy=spec["policy"], round_to=spec.get("round_to", 1), **kwargs)
    method = "tucker2" if spec["method"] == MIXED else spec["method"]  # mixed: every rank-file entry names its method
    return dataclasses.replace(base, ranks=ranks, method=method, latency=None)


def evaluate(spec: dict, ctx: Context, *, model_out: Path | None = None) -> dict:
    """Build ``spec`` and measure it (module docstring); ``model_out`` also saves the model."""
    import onnx

    from onnxfactor.pipeline import compress
    from onnxfactor.validation.run import ValidationOptions, validate

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxfactor-search-") as tmp:
        config = config_for(spec, ctx.base, Path(tmp))
        result = compress(ctx.model, config=config, input_shapes=ctx.input_shapes, calibration=_statistics(ctx),
                          finetune=ctx.finetune, finetune_data=ctx.finetune_data)
        built = time.perf_counter() - start
        options: ValidationOptions = dataclasses.replace(ctx.held_out, threads=ctx.threads, latency_runs=ctx.latency_runs)
        vr = validate(ctx.model, result.model, options=options, input_shapes=ctx.input_shapes)
        if model_out is not None:
            onnx.save(result.model, str(model_out))
    report = result.report
    agreements = [o.top1_agreement for o in vr.outputs if o.top1_agreement is not None]
    totals = report.totals
    weight_bytes = sum(_tensor_bytes(t) for t in result.model.graph.initializer)
    return {
        "spec": spec,
        "accuracy": vr.accuracy_compressed,
        "accuracy_original": vr.accuracy_original,
        "agreement": min(agreements) if agreements else None,
        "task_metric": vr.task_metric,
        "rel_error": vr.worst_rel_l2,
        "speedup": vr.speedup,
        "latency_ms": None if vr.latency_compressed is None else vr.latency_compressed.median_ms,
        "latency_original_ms": None if vr.latency_original is None else vr.latency_original.median_ms,
        "params": totals.model_params_after,
        "params_original": totals.model_params_before,
        "macs": totals.conv_macs_after + totals.linear_macs_after,
        "macs_original": totals.conv_macs_before + totals.linear_macs_before,
        "conv_macs_ratio": totals.conv_macs_ratio,
        "weight_bytes": weight_bytes,
        "decomposed": len(report.decomposed),
        "layers": {l.name: {"status": l.status, "method": l.method, "ranks": l.ranks, "output_error": l.output_error}
                   for l in report.layers},
        "finetune": None if report.finetune is None else {k: report.finetune.get(k) for k in ("steps", "loss_first", "loss_last", "seconds")},
        "samples": vr.samples,
        "build_seconds": round(built, 2),
        "seconds": round(time.perf_counter() - start, 2),
        "worker": os.getpid(),
    }


def _tensor_bytes(t) -> int:
    import math

    import onnx

    itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type else 4
    return math.prod(t.dims) * itemsize
