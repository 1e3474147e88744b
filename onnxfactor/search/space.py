"""The search space: per-layer sensitivity curves (for the allocation) and the global grid.

Sensitivity: for each method and each rank fraction ``f`` of :data:`FRACTIONS`, one
:func:`onnxfactor.analyze` pass at ``--ranks ratio --ratio f`` with the calibration statistics
gives every candidate layer's ranks, MACs, parameters and *output* error on the calibration data
(the data-aware fit, before the correction, which needs the other layers). Layers are independent
at this stage (the statistics come from the original model), so one pass per (method, f) covers
all of them. Each layer's curve is its options: keep (loss 0) plus every (method, f) that the
layer would decompose; loss = output error squared (:mod:`onnxfactor.search.allocate`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxfactor.search.allocate import Option

#: rank fractions of the sensitivity curves (and of the grid's ratio settings)
FRACTIONS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75)
#: the grid's other settings: VBMF weakening levels (1.0 = plain VBMF)
WEAKEN = (0.3, 0.6, 1.0)
BYTES_PER_PARAM = 4  # float32 weights: the allocation's byte cost (the built model is measured exactly)


def sensitivity(model, stats, base, *, methods=("tucker2",), fractions=FRACTIONS, round_to: int = 1, input_shapes=None,
                timer=None):
    """``(curves, rows, totals)``: per layer its :class:`Option` list, the raw figures for the report /
    plots, and the model's totals before compression (:class:`onnxfactor.report.Totals`).

    With a ``timer`` (``--layer-timing``) every option also costs ``ms``: its chain timed against
    the Conv in ONNX Runtime at the layer's real input shape (:func:`onnxfactor.latency.time_layer`),
    keep costing the Conv's own median over those timings; the allocation then orders the front by
    summed measured layer time instead of MACs (small ranks buy little speed on memory-bound 1x1s).
    Only the Convs are timed: linear layers (``--include-linear``), and Convs that cannot be timed
    alone (inside a subgraph, unknown shapes, an op the provider cannot run by itself), cost ``ms``
    in proportion to their MACs at the timed Convs' mean ms per MAC (1 ms per million MACs when
    none could be timed: the front is then the MACs front)."""
    from onnxfactor.config import RankConfig
    from onnxfactor.pipeline import analyze

    curves: dict[str, list[Option]] = {}
    rows: list[dict] = []
    before: dict[str, tuple] = {}
    totals = None
    for method in methods:
        for f in fractions:
            config = dataclasses.replace(base, method=method, latency=None,
                                         ranks=RankConfig(policy="ratio", ratio=f, round_to=round_to))
            report = analyze(model, config=config, calibration=stats, input_shapes=input_shapes, timer=timer)
            totals = totals or report.totals
            for layer in report.layers:
                if layer.macs_before is None:
                    continue
                before[layer.name] = (layer.macs_before, layer.params_before)
                if layer.status != "would decompose":
                    continue
                error = layer.output_error if layer.output_error is not None else layer.rel_reconstruction_error
                timing = layer.latency or {}
                rows.append({"layer": layer.name, "method": method, "fraction": f, "ranks": layer.ranks, "output_error": error,
                             "weight_error": layer.rel_reconstruction_error, "macs": layer.macs_after, "params": layer.params_after,
                             "macs_before": layer.macs_before, "params_before": layer.params_before,
                             "chain_ms": timing.get("chain_ms"), "original_ms": timing.get("original_ms")})
                curves.setdefault(layer.name, []).append(Option(
                    layer.name, {"method": method, "ranks": layer.ranks}, float(error) ** 2,
                    _costs(layer.macs_after, layer.params_after, timing.get("chain_ms")), label=f"{method}@{f:g}"))
    conv_ms = {}
    for r in rows:
        if r["original_ms"] is not None:
            conv_ms.setdefault(r["layer"], []).append(r["original_ms"])
    conv_ms = {name: float(np.median(v)) for name, v in conv_ms.items()}
    per_mac = sum(conv_ms.values()) / max(sum(before[n][0] for n in conv_ms), 1) if conv_ms else None
    for name, options in curves.items():
        macs, params = before[name]
        options.insert(0, Option(name, None, 0.0, _costs(macs, params, conv_ms.get(name)), label="keep"))
        if timer is not None:  # untimed options (linear layers) by the timed Convs' ms per MAC
            options = [o if "ms" in o.costs else dataclasses.replace(o, costs={**o.costs, "ms": o.costs["macs"] * (per_mac or 1e-6)})
                       for o in options]
        curves[name] = _deduplicated(options)
    return curves, rows, totals


def _costs(macs: int, params: int, ms: float | None = None) -> dict:
    costs = {"macs": float(macs), "params": float(params), "bytes": float(params * BYTES_PER_PARAM)}
    if ms is not None:
        costs["ms"] = float(ms)
    return costs


def _deduplicated(options: list[Option]) -> list[Option]:
    """Options with the same ranks (small layers: several fractions round to one rank) once, the first."""
    seen, out = set(), []
    for o in options:
        key = None if o.setting is None else (o.setting["method"], repr(sorted((o.setting["ranks"] or {}).items())))
        if key in seen:
            continue
        seen.add(key)
        out.append(o)
    return out


def grid_specs(methods=("tucker2",), fractions=FRACTIONS, weaken=WEAKEN, round_to=(1, 8)) -> list[dict]:
    """The seed's grid: method x (ratio fractions, VBMF weakening levels) x rank rounding."""
    specs = []
    for method in methods:
        for r in round_to:
            specs += [{"kind": "global", "method": method, "policy": "ratio", "value": f, "round_to": r} for f in fractions]
            specs += [{"kind": "global", "method": method, "policy": "weakened", "value": w, "round_to": r} for w in weaken]
    return specs


#: the spec method of an allocation over several methods: each layer's entry names its own
MIXED = "mixed"


def layer_spec(method: str, settings: dict) -> dict:
    """The evaluation spec of an allocation: per layer its ranks (None = keep), written as a rank
    file. With ``method`` :data:`MIXED` every entry also names its layer's method (the rank file's
    ``{"method": ...}`` entries), so one candidate may mix Tucker-2, CP and Tucker-3 layers."""
    def entry(s):
        if s is None:
            return None
        return {"method": s["method"], **s["ranks"]} if method == MIXED else s["ranks"]

    return {"kind": "layers", "method": method, "ranks": {n: entry(s) for n, s in sorted(settings.items())}}
