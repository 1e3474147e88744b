"""The search: candidates built and measured until the best one meeting every requirement is known.

``strategy="allocate"`` (default):

1. calibration statistics, once; per-layer sensitivity curves (:mod:`onnxfactor.search.space`;
   with ``sensitivity="network"`` each option's loss measured end to end instead,
   :mod:`onnxfactor.search.network`);
2. the exact Pareto front of (cost, predicted loss) over per-layer choices (with several
   ``methods``, each layer's options of all of them: the allocation picks a method per layer)
   (:mod:`onnxfactor.search.allocate`), the cost being the objective's (MACs for ``latency`` and
   ``macs``, parameters for ``params``; with ``layer_timing`` the summed measured ms of the layers,
   each chain timed against its Conv in ONNX Runtime during the sensitivity pass); points over a size cap (``--max-params``, ``--max-macs``,
   ``--max-weight-mb``, predicted exactly from the per-layer counts) are dropped;
3. a parallel bisection along the front, cheapest first: each round builds and measures
   ``jobs`` evenly spaced points between the cheapest known-feasible and the most expensive
   known-infeasible one (at least 2, so that a round narrows the interval by 3x or more), on the
   assumption that the measured figures get better with cost; rounds stop when the interval is
   closed, after ``max_evaluations`` candidates or at the time budget;
4. the winner is the best objective value (measured latency, MACs or parameters of the built model)
   among the measured candidates that meet every requirement.

``strategy="grid"``: every global setting of :func:`onnxfactor.search.space.grid_specs` is built
and measured (the seed idea), and the winner chosen the same way.

When no measured candidate meets the requirements, :class:`ConstraintsNotMet` (exit 7) names the
requirement the closest candidate misses; the closest is the one with the fewest violations, then
the smallest relative excess.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path

from onnxfactor.errors import ConstraintsNotMet, UsageError
from onnxfactor.search.allocate import pareto_allocations
from onnxfactor.search.constraints import OBJECTIVES, Constraints, agreement_of, check_constraints, objective_value, violations
from onnxfactor.search.evaluate import Context
from onnxfactor.search.executor import Cache, Executor, default_jobs
from onnxfactor.search.space import FRACTIONS, MIXED, WEAKEN, grid_specs, layer_spec, sensitivity

STRATEGIES = ("allocate", "grid")
SENSITIVITIES = ("layer", "network")


def rounding(config: "SearchConfig") -> int:
    """The allocation's rank rounding: ``config.round_to``, or by default 8 for the latency objective
    (ONNX Runtime's NCHWc kernels block channels by 8/16: on both bundled models the allocation's
    winner ran faster rounded, 1.83x against 1.71x and 2.80x against 2.14x, see the README) and 1
    for ``macs`` / ``params``, where rounding up only adds what is minimised."""
    if config.round_to is not None:
        return config.round_to
    return 8 if config.objective == "latency" else 1


@dataclass(frozen=True)
class SearchConfig:
    """Options of :func:`search` (see the module docstring)."""

    constraints: Constraints = field(default_factory=Constraints)
    objective: str = "latency"
    strategy: str = "allocate"
    methods: tuple[str, ...] = ("tucker2",)
    fractions: tuple[float, ...] = FRACTIONS
    round_to: int | None = None       # allocate's rank rounding; None: 8 for objective latency, else 1 (see rounding())
    grid_round_to: tuple[int, ...] = (1, 8)
    weaken: tuple[float, ...] = WEAKEN       # the grid's VBMF weakening levels
    jobs: int | None = None           # None: default_jobs()
    ray_address: str | None = None
    cache: Path | None = None
    time_budget: float | None = None  # seconds
    max_evaluations: int = 16
    latency_runs: int = 30
    threads: int | None = None        # ORT threads per worker (None: cores // jobs)
    layer_timing: bool = False        # allocate by measured per-layer ms instead of MACs (objective latency)
    timing_cache: Path | None = None  # with layer_timing: the timing cache file (as compress --timing-cache)
    sensitivity: str = "layer"        # allocate's per-option loss: "layer" output error, or "network" (search/network.py)
    sensitivity_samples: int = 32     # with sensitivity "network": calibration samples each option is judged on


@dataclass
class SearchResult:
    winner: dict | None
    candidates: list[dict]
    sensitivity: list[dict]
    front: list[dict]
    config: dict
    seconds: dict
    exact_front: bool = True
    cache_hits: int = 0
    stopped: str | None = None  # why the search stopped early (time budget)
    statistics: object = None   # the CalibrationData (not in the JSON)
    network_sensitivity: dict | None = None  # with sensitivity "network": options judged, samples, seconds

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("statistics")
        return d


def _file_hash(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:24]


def _metric_identity(metric) -> str | None:
    """The task metric's name and, for a script, its file's content (an edited metric misses the cache)."""
    if metric is None:
        return None
    spec = getattr(metric, "spec", metric)
    if isinstance(spec, str):
        return f"{spec.rpartition(':')[2]}:{_file_hash(Path(spec.rpartition(':')[0]))}"
    return f"{getattr(spec, '__module__', '')}.{getattr(spec, '__qualname__', repr(spec))}"


def _identity(thing) -> str:
    """A content identity of a data argument (file hash of paths, repr otherwise)."""
    try:
        p = Path(thing)
        if p.is_file():
            return _file_hash(p)
        if p.is_dir():
            return "dir:" + hashlib.sha256("\n".join(f"{f.relative_to(p)}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                                                     for f in sorted(p.rglob("*")) if f.is_file()).encode()).hexdigest()[:24]
    except TypeError:
        pass
    return repr(thing)


def search(model, calibration, held_out, *, config: SearchConfig | None = None, base=None, images=None, input_shapes=None,
           finetune=None, progress=None, executor_factory=None, timer=None) -> SearchResult:
    """Search for the best compressed ``model`` under ``config.constraints`` (module docstring).

    ``held_out`` is a :class:`onnxfactor.validation.run.ValidationOptions` with data (the samples that
    report accuracy; never the calibration samples). ``finetune`` (a
    :class:`~onnxfactor.config.FinetuneConfig`) fine-tunes every candidate briefly with it.
    ``executor_factory(ctx, cache)`` replaces the evaluator (tests: a fake one); ``timer`` the
    per-layer timer of ``config.layer_timing`` (tests: :class:`onnxfactor.latency.FakeTimer`).
    """
    from onnxfactor import calibrate
    from onnxfactor.config import CompressConfig
    from onnxfactor.data.shapes import shape_sources, with_data_shapes
    from onnxfactor.io import load_model

    config = config or SearchConfig()
    base = base or CompressConfig()
    _check(config, held_out)
    t0 = time.perf_counter()
    seconds: dict = {}
    model = Path(model)
    input_shapes, _ = with_data_shapes(load_model(model).model, input_shapes, shape_sources(calibration, images, held_out))
    stats = calibrate(model, calibration, config=base, images=images, input_shapes=input_shapes)
    seconds["calibration"] = round(time.perf_counter() - t0, 2)
    cache = Cache(config.cache)
    folder = Path(config.cache) if config.cache is not None else None
    stats_file = _stats_file(stats, folder)
    identity = {"model": _file_hash(model), "calibration": _identity(calibration), "held_out": _identity(held_out.data),
                "max_samples": held_out.max_samples, "metric": _metric_identity(held_out.metric), "base": repr(base), "finetune": repr(finetune),
                "input_shapes": repr(input_shapes), "latency_runs": config.latency_runs}
    ctx = Context(model=model, base=base, held_out=held_out, input_shapes=input_shapes, stats_file=stats_file,
                  threads=config.threads, latency_runs=config.latency_runs, finetune=finetune,
                  finetune_data=calibration if finetune is not None else None, identity=identity)
    jobs = config.jobs or default_jobs()
    executor = executor_factory(ctx, cache) if executor_factory else Executor(ctx, jobs=jobs, ray_address=config.ray_address, cache=cache)
    deadline = None if config.time_budget is None else t0 + config.time_budget
    candidates: list[dict] = []
    sens_rows: list[dict] = []
    front_rows: list[dict] = []
    network = None
    exact = True
    stopped = None
    try:
        if config.strategy == "grid":
            specs = grid_specs(config.methods, config.fractions, config.weaken, round_to=config.grid_round_to)
            for i in range(0, len(specs), jobs):
                if deadline is not None and time.perf_counter() > deadline:
                    stopped = f"time budget reached after {len(candidates)} of {len(specs)} grid candidates"
                    break
                candidates += _judged(executor.run(specs[i:i + jobs]), config)
                _report(progress, len(candidates), len(specs), candidates[-1])
        else:
            t = time.perf_counter()
            if config.layer_timing and timer is None:
                timer = _layer_timer(config, held_out, jobs)
            curves_all, sens_rows, totals = sensitivity(model, stats, base, methods=config.methods, fractions=config.fractions,
                                                        round_to=rounding(config), input_shapes=input_shapes,
                                                        timer=timer if config.layer_timing else None)
            seconds["sensitivity"] = round(time.perf_counter() - t, 2)
            if not curves_all:
                from onnxfactor.errors import NothingToCompress

                raise NothingToCompress("no Conv of the model would be decomposed at any rank fraction of the search")
            if config.sensitivity == "network":
                from onnxfactor.search.network import network_sensitivity

                t = time.perf_counter()
                network = network_sensitivity(curves_all, sens_rows, model, stats, base, methods=config.methods,
                                              fractions=config.fractions, round_to=rounding(config), input_shapes=input_shapes,
                                              samples=config.sensitivity_samples, progress=progress)
                seconds["network_sensitivity"] = round(time.perf_counter() - t, 2)
            others = _fixed_costs(curves_all, totals)
            candidates, front_rows, exact, stopped = run_allocation(curves_all, others, executor, config, jobs, deadline, progress)
    finally:
        if hasattr(executor, "close"):
            executor.close()
    seconds["total"] = round(time.perf_counter() - t0, 2)
    result = SearchResult(pick_winner(candidates, config.objective), candidates, sens_rows, front_rows, _config_dict(config), seconds, exact,
                          getattr(getattr(executor, "cache", None), "hits", 0), stopped, stats,
                          network_sensitivity=network)
    return result


def run_allocation(curves_all: dict, others: dict, executor, config: SearchConfig, jobs: int, deadline=None, progress=None):
    """Steps 2-3 of the module docstring: ``(candidates, front rows, exact, stopped)``.

    ``others``: the model's totals outside the searched layers (``params``, ``bytes``, ``macs``),
    so that the size caps apply to the whole model.
    """
    candidates, front_rows, exact, stopped = [], [], True, None
    key = "params" if config.objective == "params" else "ms" if config.layer_timing else "macs"
    caps = {k: v - others[k] for k, v in config.constraints.caps().items()}
    # several methods: one front over every layer's options of all of them (a method per layer)
    fronts = [MIXED] if len(config.methods) > 1 else list(config.methods)
    for method in fronts:
        curves = {n: [o for o in opts if o.setting is None or method in (MIXED, o.setting["method"])] for n, opts in curves_all.items()}
        front, ok = pareto_allocations(curves, key=key)
        exact = exact and ok
        front = [a for a in front if all(a.costs[k] <= v for k, v in caps.items())
                 and any(o.setting is not None for o in a.choice.values())]  # the original itself is no candidate
        specs = [layer_spec(method, a.settings()) for a in front]
        front_rows += [{"method": method, "predicted_loss": a.loss, **{k: v + others[k] for k, v in a.costs.items()}} for a in front]
        found, stopped = _bisect(specs, executor, config, jobs, deadline, progress)
        candidates += found
        if stopped:
            break
    return candidates, front_rows, exact, stopped


def pick_winner(candidates: list[dict], objective: str) -> dict | None:
    """The best objective value among the candidates without violations (ties: higher accuracy)."""
    feasible = [c for c in candidates if not c["violations"]]
    return min(feasible, key=lambda c: (objective_value(objective, c), -(c.get("accuracy") or 0)), default=None)


def infeasible(result: SearchResult, constraints: Constraints) -> ConstraintsNotMet:
    """The one-line error of a search without a feasible candidate."""
    if not result.candidates:
        return ConstraintsNotMet("no candidate was evaluated (time budget too short, or every candidate exceeds a size cap); "
                                 "loosen --max-params / --max-macs / --max-weight-mb or raise --time-budget")
    closest = closest_candidate(result.candidates)
    binding = closest["violations"][0]
    return ConstraintsNotMet(f"no candidate meets the requirements: the closest ({describe(closest['spec'])}) misses {binding}"
                             + (f" and {len(closest['violations']) - 1} more" if len(closest["violations"]) > 1 else "")
                             + "; loosen that requirement, or add --write-best to write the closest candidate")


def closest_candidate(candidates: list[dict]) -> dict:
    return min(candidates, key=lambda c: (len(c["violations"]), c.get("excess", 0.0)))


def describe(spec: dict) -> str:
    if spec["kind"] == "global":
        value = "" if spec.get("value") is None else f" {spec['value']:g}"
        return f"{spec['method']} {spec['policy']}{value} round-to {spec.get('round_to', 1)}"
    decomposed = sum(r is not None for r in spec["ranks"].values())
    if spec["method"] == MIXED:
        counts: dict[str, int] = {}
        for r in spec["ranks"].values():
            if r is not None:
                counts[r["method"]] = counts.get(r["method"], 0) + 1
        methods = ", ".join(f"{m} {k}" for m, k in sorted(counts.items()))
        return f"per-layer methods ({methods}) and ranks, {decomposed} of {len(spec['ranks'])} layers decomposed"
    return f"{spec['method']} per-layer ranks, {decomposed} of {len(spec['ranks'])} layers decomposed"


def _check(config: SearchConfig, held_out) -> None:
    if config.objective not in OBJECTIVES:
        raise UsageError(f"unknown objective {config.objective!r}; choose one of {', '.join(OBJECTIVES)} (--objective)")
    if config.strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {config.strategy!r}; choose one of {', '.join(STRATEGIES)} (--strategy)")
    if held_out is None or held_out.data is None:
        raise UsageError("the search measures every candidate on held-out data: give --data HELD_OUT")
    labels = config.constraints.max_accuracy_drop is None or _has_labels(held_out)
    check_constraints(config.constraints, labels=labels)
    if config.objective == "latency" and config.latency_runs < 1:
        raise UsageError("--objective latency needs measurements: --latency-runs >= 1")
    if config.sensitivity not in SENSITIVITIES:
        raise UsageError(f"unknown sensitivity {config.sensitivity!r}; choose one of {', '.join(SENSITIVITIES)} (--sensitivity)")
    if config.sensitivity_samples < 1:
        raise UsageError("--sensitivity-samples must be at least 1")
    if config.layer_timing and (config.strategy != "allocate" or config.objective != "latency"):
        raise UsageError("--layer-timing orders the allocation by measured layer time: it needs --strategy allocate "
                         "and --objective latency")


def _layer_timer(config: SearchConfig, held_out, jobs: int):
    """The per-layer timer of ``--layer-timing``: ONNX Runtime with the workers' threads, cached on request."""
    from onnxfactor.latency import OrtTimer
    from onnxfactor.timing_cache import cached_timer
    from onnxfactor.validation import resolve_providers

    providers = resolve_providers(held_out.provider)
    threads = config.threads if config.threads is not None else max(1, default_jobs() // max(jobs, 1))
    return cached_timer(OrtTimer(providers, threads), config.timing_cache, providers, threads)


def _has_labels(held_out) -> bool:
    import numpy as np

    try:
        if str(held_out.data).endswith(".npz") and Path(held_out.data).is_file():
            return "labels" in np.load(held_out.data).files
    except (OSError, ValueError):
        return False
    return True  # other sources: judged when measured (accuracy None -> the requirement is violated)


def _stats_file(stats, folder: Path | None) -> Path:
    import tempfile

    target = folder if folder is not None else Path(tempfile.mkdtemp(prefix="onnxfactor-search-"))
    target.mkdir(parents=True, exist_ok=True)
    path = target / "statistics.pkl"
    with open(path, "wb") as f:
        pickle.dump(stats, f, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def _fixed_costs(curves, totals) -> dict:
    """Model-wide totals outside the searched layers (their caps apply to the whole model)."""
    other_params = totals.model_params_before - sum(opts[0].costs["params"] for opts in curves.values())
    macs = totals.conv_macs_before + totals.linear_macs_before - sum(opts[0].costs["macs"] for opts in curves.values())
    return {"params": other_params, "bytes": other_params * 4.0, "macs": macs, "ms": 0.0}  # ms: the searched layers' sum


def _judged(results: list[dict], config: SearchConfig) -> list[dict]:
    for r in results:
        r["violations"] = violations(config.constraints, r)
        r["excess"] = _excess(config.constraints, r)
    return results


def _excess(c: Constraints, m: dict) -> float:
    """Sum of relative excesses over the violated requirements (to rank near misses)."""
    total = 0.0
    pairs = [
        (None if m.get("accuracy") is None or m.get("accuracy_original") is None else 100 * (m["accuracy_original"] - m["accuracy"]),
         c.max_accuracy_drop, True),
        (agreement_of(m), c.min_agreement, False), (m.get("rel_error"), c.max_rel_error, True),
        (None if m.get("weight_bytes") is None else m["weight_bytes"] / 1e6, c.max_weight_mb, True),
        (m.get("params"), c.max_params, True), (m.get("macs"), c.max_macs, True),
        (m.get("speedup"), c.target_speedup, False), (m.get("latency_ms"), c.max_latency_ms, True),
    ]
    for value, limit, above in pairs:
        if limit is None or value is None:
            continue
        gap = (value - limit) if above else (limit - value)
        if gap > 0:
            total += gap / max(abs(limit), 1e-9)
    return total


def _bisect(specs: list[dict], executor, config: SearchConfig, jobs: int, deadline, progress) -> tuple[list[dict], str | None]:
    """Parallel bisection along a front ordered cheapest first (module docstring)."""
    if not specs:
        return [], None
    done: dict[int, dict] = {}
    lo, hi = -1, len(specs)  # every index <= lo is infeasible-or-unknown-cheap; >= hi known feasible
    # first round: the most expensive point (is anything feasible?) and evenly spaced ones
    width = max(2, jobs)
    while hi - lo > 1 and len(done) < config.max_evaluations:
        if deadline is not None and time.perf_counter() > deadline:
            return list(done.values()), f"time budget reached after {len(done)} candidates"
        inside = list(range(lo + 1, hi))
        if not done:  # evenly spaced, the most expensive point included (is anything feasible?)
            picks = sorted({inside[round((k + 1) * (len(inside) - 1) / width)] for k in range(width)})
        else:  # evenly spaced strictly inside the open interval
            picks = sorted({inside[round((k + 1) * (len(inside) - 1) / (width + 1))] for k in range(width)})
        picks = [p for p in picks if p not in done][: max(1, config.max_evaluations - len(done))]
        if not picks:
            break
        results = _judged(executor.run([specs[p] for p in picks]), config)
        for p, r in zip(picks, results):
            r["front_index"] = p
            done[p] = r
            _report(progress, len(done), config.max_evaluations, r)
        feasible = [p for p in done if not done[p]["violations"]]
        hi = min(feasible, default=len(specs))
        infeasible_below = [p for p in done if done[p]["violations"] and p < hi]
        lo = max(infeasible_below, default=-1)
        if not feasible and max(done) == len(specs) - 1:
            break  # the most expensive point misses: nothing cheaper will meet the accuracy requirements
    return [done[p] for p in sorted(done)], None


def _report(progress, done: int, total: int, r: dict) -> None:
    if progress is None:
        return
    acc = r.get("accuracy")
    parts = [describe(r["spec"]), f"MACs {r['macs_original'] / max(r['macs'], 1):.2f}x" if r.get("macs") else ""]
    if acc is not None:
        parts.append(f"accuracy {acc:.2%}")
    elif agreement_of(r) is not None:
        parts.append(f"{'task metric' if r.get('task_metric') is not None else 'agreement'} {agreement_of(r):.4f}")
    if r.get("speedup"):
        parts.append(f"{r['speedup']:.2f}x measured")
    parts.append("meets all" if not r["violations"] else f"misses {r['violations'][0]}")
    progress(done, total, ", ".join(p for p in parts if p))


def _config_dict(config: SearchConfig) -> dict:
    d = dataclasses.asdict(config)
    d["constraints"] = config.constraints.to_dict()
    d["round_to"] = rounding(config)  # the value used, default resolved
    return json.loads(json.dumps(d, default=str))
