"""Iterative compress + fine-tune (``--iterative``; Astrid et al. 2018, MUSCO): one stage at a time.

The selected main-graph Convs are split, in graph order, into stages of ``stage_size`` layers.
Each stage:

1. compresses only its own Convs (``nodes=`` the stage), on the model as the earlier stages left
   it: ranks (VBMF or any policy) from the *current* weights; with calibration data, statistics,
   data-aware factors and the correction from the *current* activations;
2. distils the original model (the teacher of every stage, never a partly compressed one) into
   the result on the fine-tuning data. Trainable: the chains made so far and the Convs still
   waiting for their stage (``--train factors``), or every float weight (``--train all``); the
   waiting Convs train so that the next stage's ranks are re-estimated from updated weights, as
   in the papers, where the whole network is fine-tuned between stages;
3. measures the stage on the held-out data (``--data``), when given: top-1 agreement, accuracy
   with labels, worst output relative L2 error.

Each stage gets the fine-tuning length of ``--epochs`` / ``--steps``, so the total is
``stages x`` that. The report's ``finetune.stages`` lists every stage's nodes, ranks, MAC cut so
far, losses, time and held-out figures; its layer rows are those of the stage that decomposed
each Conv. Latency selection (``--measure``) runs inside each stage, on that stage's layers.
With ``include_linear`` the selected Gemm / MatMul layers take part like the Convs: sorted with
them in graph order into the same stages, decomposed by :mod:`onnxfactor.linear` when their stage
comes, their weights training while they wait.
"""

from __future__ import annotations

import dataclasses
import time

import onnx

from onnxfactor.config import CompressConfig, FinetuneConfig
from onnxfactor.errors import UsageError


def stages_of(names: list[str], stage_size: int) -> list[list[str]]:
    """``names`` in consecutive groups of ``stage_size`` (the last one may be shorter)."""
    if stage_size < 1:
        raise UsageError(f"--stage-size must be >= 1, got {stage_size}")
    return [names[i:i + stage_size] for i in range(0, len(names), stage_size)]


#: the ops a stage decomposes (Gemm / MatMul with ``include_linear``)
STAGED_OPS = ("Conv", "Gemm", "MatMul")


def waiting_weights(model: onnx.ModelProto, names: set[str]) -> set[str]:
    """Weight and bias initializers of the (not yet decomposed) Conv / Gemm / MatMul nodes called ``names``."""
    initializers = {t.name for t in model.graph.initializer}
    return {i for node in model.graph.node if node.op_type in STAGED_OPS and node.name in names
            for i in node.input[1:] if i in initializers}


def staged_layers(prep, config: CompressConfig, explicit) -> list[str]:
    """Names of the selected main-graph Convs (and linear layers, with ``include_linear``), in graph order."""
    from onnxfactor.decompose import selection_reason

    order = {node.name: i for i, node in enumerate(prep.graph.nodes)}
    sites = [*prep.sites, *prep.linear_sites]
    chosen = [s for s in sites if s.graph_path == "" and selection_reason(s, config, explicit) is None]
    return [s.name for s in sorted(chosen, key=lambda s: order.get(s.name, len(order)))]


def compress_iterative(model, *, config: CompressConfig, finetune: FinetuneConfig, stage_size: int, calibration,
                       finetune_data=None, images=None, input_shapes=None, held_out=None, progress=None, timer=None):
    """Iterative compression (module docstring); returns a :class:`onnxfactor.pipeline.CompressResult`.

    ``held_out`` (a :class:`onnxfactor.validation.run.ValidationOptions` with data) measures each stage.
    """
    from onnxfactor.analysis import count_params
    from onnxfactor.finetune.stage import finetune_model
    from onnxfactor.pipeline import CompressResult, compress
    from onnxfactor.prepare import load_explicit, prepare, runnable
    from onnxfactor.validation.run import validate
    from onnxfactor.report import Totals

    start = time.perf_counter()
    prep = prepare(model, input_shapes, include_linear=config.include_linear, fold_batchnorm=config.fold_batchnorm)
    teacher = runnable(prep.loaded)
    explicit = load_explicit(config, prep.sites, prep.linear_sites)
    selected = staged_layers(prep, config, explicit)
    if not selected:
        what = "Conv, Gemm or MatMul" if config.include_linear else "Conv"
        raise UsageError(f"--iterative: no main-graph {what} is selected for decomposition (see --nodes / --exclude)")
    plan = stages_of(selected, stage_size)
    data = calibration if finetune_data is None else finetune_data
    current, rows, stages, first = teacher, {}, [], None
    for index, names in enumerate(plan):
        t = time.perf_counter()
        stage_config = dataclasses.replace(config, nodes=tuple(names), exclude=())
        label = f"stage {index + 1}/{len(plan)}"
        step = (lambda d, n, text, label=label: progress(d, n, f"{label}: {text}")) if progress is not None else None
        result = compress(current, config=stage_config, input_shapes=prep.input_shapes, calibration=calibration, images=images,
                          progress=step, timer=timer)
        first = first or result.report
        decomposed = {layer.name: layer for layer in result.report.layers if layer.name in names}
        rows.update(decomposed)
        out = result.model
        later = {n for rest in plan[index + 1:] for n in rest}
        record = {"stage": index + 1, "nodes": names,
                  "ranks": {n: (layer.ranks if layer.status == "decomposed" else None) for n, layer in decomposed.items()},
                  "decomposed": sum(layer.status == "decomposed" for layer in decomposed.values())}
        if any(layer.status == "decomposed" for layer in rows.values()):
            extra = waiting_weights(out, later) if finetune.train == "factors" else set()
            tuned = finetune_model(out, teacher, data, finetune, images=images, samples=config.calibration.samples,
                                   progress=step, extra_trainable=extra)
            record["finetune"] = {k: tuned.get(k) for k in ("steps", "loss_first", "loss_last", "held_out_loss_before",
                                                            "held_out_loss_after", "applied", "seconds", "peak_rss_mb",
                                                            "per_epoch", "trained_initializers")}
        totals = Totals.of([rows.get(layer.name, layer) for layer in first.layers], 0, 0)
        record["conv_macs_ratio_so_far"] = totals.conv_macs_ratio
        if held_out is not None and held_out.data is not None:
            vr = validate(teacher, out, options=dataclasses.replace(held_out, latency_runs=0))
            agreements = [o.top1_agreement for o in vr.outputs if o.top1_agreement is not None]
            record["held_out"] = {"top1_agreement": min(agreements) if agreements else None,
                                  "accuracy": vr.accuracy_compressed, "accuracy_original": vr.accuracy_original,
                                  "worst_rel_l2": vr.worst_rel_l2, "task_metric": vr.task_metric}
        record["seconds"] = round(time.perf_counter() - t, 2)
        stages.append(record)
        if progress is not None:
            progress(index + 1, len(plan), f"{label} done: {stage_summary(record)}")
        current = out

    report = first
    report.config = dataclasses.asdict(config)
    report.layers = [_relabelled(rows.get(layer.name, layer), layer.name in selected, config, explicit, prep) for layer in first.layers]
    report.totals = Totals.of(report.layers, count_params(teacher), count_params(current))
    report.finetune = {"iterative": True, "stage_size": stage_size, "stages": stages,
                       "seconds": round(sum(s.get("finetune", {}).get("seconds") or 0 for s in stages), 2),
                       "peak_rss_mb": max((s.get("finetune", {}).get("peak_rss_mb") or 0 for s in stages), default=0)}
    report.timings = {"total": time.perf_counter() - start}
    return CompressResult(current, report, external_data=prep.loaded.external_data, run_error=prep.run_error)


def stage_summary(record: dict) -> str:
    """One line of a stage's figures (progress bar and CLI)."""
    parts = [f"conv MACs {record['conv_macs_ratio_so_far']:.2f}x" if record.get("conv_macs_ratio_so_far") else "conv MACs ?"]
    if record.get("finetune"):
        parts.append(f"loss {record['finetune']['loss_first']:.4g} -> {record['finetune']['loss_last']:.4g}")
    held = record.get("held_out") or {}
    if held.get("top1_agreement") is not None:
        parts.append(f"held-out agreement {held['top1_agreement']:.4f}")
    if held.get("accuracy") is not None:
        parts.append(f"accuracy {held['accuracy']:.2%}")
    if held.get("task_metric") is not None:
        parts.append(f"task metric {held['task_metric']:.4f}")
    return ", ".join(parts)


def _relabelled(layer, selected: bool, config, explicit, prep):
    """A row of a Conv no stage selected says why (``--exclude``...), not 'not selected (--nodes)'."""
    if selected:
        return layer
    from onnxfactor.decompose import selection_reason

    site = next((s for s in [*prep.sites, *prep.linear_sites] if s.name == layer.name), None)
    reason = selection_reason(site, config, explicit) if site is not None else layer.reason
    return dataclasses.replace(layer, reason=reason or layer.reason)
