"""Measured speed decides: keep a decomposed layer only if it is faster, never write a slower model.

The pipeline hands over one :class:`Candidate` per Conv whose chain passed the rank choice and the
MAC/parameter margin. With a :class:`~onnxfactor.latency.Timer` (ONNX Runtime in practice, a fake
one in tests) this module

1. :func:`select_faster_layers` times every candidate's Conv against its chain alone, at the
   layer's real input shape (:func:`onnxfactor.latency.time_chains`), together with the chain's
   rank-rounded variants (ranks rounded up to multiples of 8 and 16: the reconstruction error can
   only fall) and keeps the fastest variant if it beats the Conv by ``1 + margin``; otherwise
   the layer is kept undecomposed, with both timings in its reason;
2. :func:`guard_end_to_end` times the original and the rewritten model end to end; while the
   rewritten one is not ``1 + margin`` times as fast, it rolls back the layers that saved the least measured time (a
   quarter of the remaining ones per round, at least one) and measures again;
3. :func:`meet_budget` (``--target-speedup`` / ``--max-latency-ms``) picks, per layer, one of
   several weakening levels of the VBMF ranks (or none) to reach the budget with the smallest sum
   of squared reconstruction errors: greedily by measured time saved per unit of added error,
   then checked end to end and tightened until the measurement meets the budget or every option
   is used.

:func:`measured_selection` runs them as ``compress`` asks (its ``LatencyConfig``).

Layers inside control-flow subgraphs (or without a known input shape) cannot be timed alone: they
are kept as decided by MACs and count in the end-to-end guard like the others.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable

import onnx

from onnxfactor.analysis import ConvSite
from onnxfactor.errors import first_line
from onnxfactor.latency import LayerTiming, Timer, time_chains
from onnxfactor.methods.base import ChainSpec
from onnxfactor.report import LayerReport

#: Steps the rank search rounds ranks up to (ONNX Runtime's NCHWc blocks are 8 or 16 channels).
ROUNDING_STEPS = (8, 16)
#: Share of the remaining decomposed layers rolled back per round of the end-to-end guard.
ROLLBACK_SHARE = 0.25


@dataclass
class Candidate:
    """One Conv that would be decomposed: its site, report row and chain options (first = chosen)."""

    site: ConvSite
    layer: LayerReport
    options: list[ChainSpec]
    chain: ChainSpec | None = None      # the chain applied; None = kept
    timing: LayerTiming | None = None   # of ``chain`` (or of the best option when kept)
    #: per-option timings, parallel to ``options`` (None: not timed)
    option_timings: list[LayerTiming | None] = field(default_factory=list)

    def __post_init__(self):
        if self.chain is None and self.options:
            self.chain = self.options[0]

    @property
    def timed(self) -> bool:
        return self.timing is not None

    @property
    def saved_ms(self) -> float | None:
        return None if self.timing is None else self.timing.original_ms - self.timing.chain_ms


def rounded_ranks(ranks: dict, sizes: dict, step: int) -> dict | None:
    """``ranks`` with every decomposed rank rounded up to a multiple of ``step``; None if unchanged.

    ``sizes`` maps each mode to its size: a rank reaching it means the mode is not decomposed
    (``None``); the ``"rank"`` of CP / SVD is capped at its size instead. None also when nothing
    would be decomposed any more.
    """
    out = {}
    for mode, rank in ranks.items():
        if rank is None or mode == "spatial":  # the spatial rank is no channel count
            out[mode] = rank
            continue
        r = min(math.ceil(rank / step) * step, sizes[mode])
        out[mode] = None if r >= sizes[mode] and mode != "rank" else r
    if out == ranks or all(r is None for r in out.values()):
        return None
    return out


def _apply_timing(candidate: Candidate, index: int) -> None:
    """Make option ``index`` the candidate's chain and refresh its report row."""
    chain, layer, site = candidate.options[index], candidate.layer, candidate.site
    candidate.chain, candidate.timing = chain, candidate.option_timings[index]
    layer.describe_chain(chain, site.in_spatial, site.out_spatial)


def select_faster_layers(
    candidates: list[Candidate], timer: Timer, *, margin: float, opset: int | None = None, progress: Callable | None = None
) -> None:
    """Time each candidate's options; keep the fastest if it is ``1 + margin`` times as fast, else drop it.

    Updates each candidate (``chain``, ``timing``) and its report row (ranks, counts, ``latency``,
    and ``reason`` when dropped). Candidates that cannot be timed stay as they are.
    """
    for done, candidate in enumerate(candidates, 1):
        _select_one(candidate, timer, margin=margin, opset=opset)
        if progress is not None:
            progress(done, len(candidates), candidate.site.name)


def time_options(timer: Timer, site, chains: list, *, opset: int | None, timing=time_chains) -> list[LayerTiming] | str:
    """Each chain of ``site`` timed against its node with ``timing`` (default: the Convs'
    :func:`~onnxfactor.latency.time_chains`), or why it cannot be (a note for the report)."""
    if site.graph_path or site.input_shape is None or not all(isinstance(d, numbers.Integral) and d > 0 for d in site.input_shape):
        return "not timed (inside a subgraph or input shape unknown)"
    try:
        return timing(timer, site, chains, opset=opset)
    except Exception as e:  # noqa: BLE001 - e.g. an op or dtype the provider cannot run alone
        return f"not timed ({first_line(e)})"


def _select_one(candidate: Candidate, timer: Timer, *, margin: float, opset: int | None) -> None:
    site = candidate.site
    timings = time_options(timer, site, candidate.options, opset=opset)
    if isinstance(timings, str):
        candidate.layer.latency = {"note": f"{timings}: kept by MACs"}
        return
    candidate.option_timings = timings
    best = max(range(len(candidate.options)), key=lambda k: candidate.option_timings[k].speedup)
    _apply_timing(candidate, best)
    judge_timing(candidate, margin)


def judge_timing(candidate: Candidate, margin: float) -> None:
    """Record the candidate's timings (``timing``, ``option_timings``) in its row; drop its chain
    unless it runs ``1 + margin`` times as fast as the node it replaces."""
    timing = candidate.timing
    candidate.layer.latency = {
        **timing.to_dict(),
        "options": [
            {"method": c.method, "ranks": dict(c.ranks), "rel_error": c.rel_error, **t.to_dict()}
            for c, t in zip(candidate.options, candidate.option_timings)
        ],
    }
    if timing.speedup < 1.0 + margin:
        candidate.chain = None
        candidate.layer.reason = (
            f"measured not faster: {timing.original_ms:.3g} ms -> {timing.chain_ms:.3g} ms "
            f"({timing.speedup:.2f}x, needs {1 + margin:.2f}x; --speed-margin)"
        )


@dataclass
class GuardResult:
    """The end-to-end measurements of the guard, in order (the last one describes the output)."""

    rounds: list[dict] = field(default_factory=list)
    model: onnx.ModelProto | None = None

    @property
    def speedup(self) -> float | None:
        return self.rounds[-1]["speedup"] if self.rounds else None

    def to_dict(self) -> dict:
        return {"rounds": self.rounds, "speedup": self.speedup}


def _usefulness(candidates: list[Candidate]) -> list[Candidate]:
    """Applied candidates, least useful first: measured time saved; untimed ones by MACs saved,
    converted to ms at the timed layers' average ms per MAC (or by MACs alone if none was timed)."""
    applied = [c for c in candidates if c.chain is not None]
    timed = [c for c in applied if c.timed and c.layer.macs_before]
    ms_per_mac = None
    if timed:
        ms_per_mac = sum(c.timing.original_ms for c in timed) / sum(c.layer.macs_before for c in timed)

    def saved(c: Candidate) -> float:
        if c.timed:
            return c.saved_ms
        macs = (c.layer.macs_before or 0) - (c.layer.macs_after or 0)
        return macs * ms_per_mac if ms_per_mac is not None else float(macs)

    return sorted(applied, key=saved)


def guard_end_to_end(
    candidates: list[Candidate],
    build: Callable[[], onnx.ModelProto],
    original: onnx.ModelProto,
    feeds: dict,
    timer: Timer,
    *,
    allow_slower: bool = False,
    margin: float = 0.0,
) -> GuardResult:
    """Roll back the least useful layers until the rewritten model runs ``1 + margin`` times as fast as ``original``.

    With the per-layer ``margin`` here too, a model that is only within measurement noise of the
    original is rolled back to the original rather than written as a "speedup" nobody can
    reproduce. ``build()`` returns the model with every candidate's current ``chain`` applied. Rolled-back
    candidates get ``chain = None`` and a reason. The result's ``model`` is the last model built
    (the one the last measurement describes), with nothing rolled back when ``allow_slower``.
    """
    result = GuardResult()
    while True:
        applied = [c for c in candidates if c.chain is not None]
        model = build()
        pair = timer.time_pair(original, model, feeds)
        speedup = pair.a_ms / pair.b_ms if pair.b_ms > 0 else math.inf
        result.rounds.append({"layers": len(applied), "original_ms": pair.a_ms, "compressed_ms": pair.b_ms, "speedup": speedup})
        result.model = model
        if speedup >= 1.0 + margin or allow_slower or not applied:
            return result
        order = _usefulness(candidates)
        count = max(1, math.ceil(ROLLBACK_SHARE * len(order)))
        for c in order[:count]:
            c.chain = None
            c.layer.reason = (
                f"rolled back by the end-to-end guard: with {len(applied)} decomposed layers the model ran "
                f"{speedup:.2f}x as fast as the original, needs {1 + margin:.2f}x (--speed-margin; --allow-slower keeps it)"
            )


# ------------------------------------------------------------------------------------------------
# Latency budget


@dataclass
class Option:
    """One way to decompose a layer for the budget: a chain and its measured saving."""

    level: float            # the VBMF weakening factor it came from
    chain: ChainSpec
    timing: LayerTiming | None

    @property
    def saved_ms(self) -> float:
        return 0.0 if self.timing is None else self.timing.original_ms - self.timing.chain_ms

    @property
    def loss(self) -> float:
        return (self.chain.rel_error or 0.0) ** 2


#: End-to-end measurements the budget search may spend.
BUDGET_ROUNDS = 6


def _ladders(levels: dict[str, list[Option]]) -> dict[str, list[Option]]:
    """Per layer the options that save time and are not dominated (more saving at less loss),
    ordered from the least saving (least loss) to the most."""
    ladders = {}
    for name, opts in levels.items():
        useful = sorted((o for o in opts if o.saved_ms > 0), key=lambda o: (o.saved_ms, -o.loss))
        walk, best_loss = [], math.inf
        for o in reversed(useful):
            if o.loss < best_loss:
                walk.append(o)
                best_loss = o.loss
        ladders[name] = list(reversed(walk))
    return ladders


def _greedy(ladders: dict[str, list[Option]], required_ms: float) -> dict[str, int]:
    """From nothing decomposed, upgrade the layer whose next option adds the most saving per unit
    of added loss, until the predicted saving reaches ``required_ms`` or nothing is left."""
    chosen: dict[str, int] = {}
    saved = 0.0
    while saved < required_ms:
        step = None
        for name, ladder in ladders.items():
            i = chosen.get(name, -1)
            if i + 1 >= len(ladder):
                continue
            prev = ladder[i] if i >= 0 else None
            gain = ladder[i + 1].saved_ms - (prev.saved_ms if prev else 0.0)
            cost = ladder[i + 1].loss - (prev.loss if prev else 0.0)
            score = gain / max(cost, 1e-12)
            if gain > 0 and (step is None or score > step[0]):
                step = (score, name, i + 1)
        if step is None:
            break
        chosen[step[1]] = step[2]
        saved = sum(ladders[n][j].saved_ms for n, j in chosen.items())
    return chosen


def meet_budget(
    candidates: list[Candidate],
    levels: dict[str, list[Option]],
    build: Callable[[], onnx.ModelProto],
    original: onnx.ModelProto,
    feeds: dict,
    timer: Timer,
    *,
    target_speedup: float | None = None,
    max_latency_ms: float | None = None,
) -> tuple[GuardResult, bool]:
    """Choose per layer an option of ``levels[name]`` (or none) to meet the budget with the least loss.

    Greedy (:func:`_greedy`): the most measured per-layer saving per unit of added loss (squared
    reconstruction error) first, until the predicted latency ``T_original - sum(saved)`` meets
    the budget. Then the model is built and measured end to end, and the requirement recalibrated
    from the measurement: a miss asks for more (at least one more upgrade), an overshoot by more
    than 10 % asks for less (less loss). At most :data:`BUDGET_ROUNDS` measurements; the met
    choice with the least loss wins. Returns the measurements and whether the budget was met; the
    candidates' chains are the final choice (out of reach: every useful option, the fastest model).
    """
    if (target_speedup is None) == (max_latency_ms is None):
        raise ValueError("give exactly one of target_speedup and max_latency_ms")
    by_name = {c.site.name: c for c in candidates}
    ladders = _ladders(levels)
    everything = {n: len(ladder) - 1 for n, ladder in ladders.items() if ladder}

    def goal_ms(original_ms: float) -> float:
        return original_ms / target_speedup if target_speedup is not None else max_latency_ms

    def choose(chosen: dict[str, int]) -> None:
        for c in candidates:
            c.chain, c.timing = None, None
            c.layer.reason = "not needed for the latency budget"
        for name, i in chosen.items():
            option, c = ladders[name][i], by_name[name]
            c.options, c.option_timings = [option.chain], [option.timing]
            _apply_timing(c, 0)
            c.layer.reason = None
            c.layer.latency = {**option.timing.to_dict(), "weaken": option.level} if option.timing else {"weaken": option.level}

    result = GuardResult()
    t_original = timer.time_pair(original, original, feeds).a_ms
    # ms to save as predicted from per-layer savings (at least 1 %: a measurement can miss even a
    # budget the original meets, by noise)
    required = max(t_original - goal_ms(t_original), 0.01 * t_original)
    best = None  # (loss, chosen, model, round) of the met choice with the least loss
    last = None
    for _ in range(BUDGET_ROUNDS):
        chosen = _greedy(ladders, required)
        if chosen == last:
            break
        last = chosen
        choose(chosen)
        model = build()
        pair = timer.time_pair(original, model, feeds)
        saved = sum(ladders[n][i].saved_ms for n, i in chosen.items())
        speedup = pair.a_ms / pair.b_ms if pair.b_ms > 0 else math.inf
        result.rounds.append({"layers": len(chosen), "original_ms": pair.a_ms, "compressed_ms": pair.b_ms, "speedup": speedup,
                              "predicted_saving_ms": saved})
        result.model = model
        met = pair.b_ms <= goal_ms(pair.a_ms)
        loss = sum(ladders[n][i].loss for n, i in chosen.items())
        if met and (best is None or loss < best[0]):
            best = (loss, chosen, model, len(result.rounds) - 1)
        needed_real = pair.a_ms - goal_ms(pair.a_ms)
        real_saving = pair.a_ms - pair.b_ms
        if met:
            if real_saving <= 1.1 * max(needed_real, 1e-9):
                break  # close to the budget: less would miss it
            required *= max(0.5, needed_real / real_saving)  # overshoot: ask for less
        else:
            if chosen == everything:
                break
            ratio = saved / real_saving if real_saving > 0 and saved > 0 else 2.0
            required = max(required * max(1.1, min(3.0, ratio)), 1.01 * saved)
    if best is None:
        return result, False
    if best[1] != last:  # restore the best met choice (the last measured one may be another)
        choose(best[1])
        result.model = best[2]
        result.rounds.append({**result.rounds[best[3]], "restored": True})
    return result, True


def measured_selection(original: onnx.ModelProto, input_shapes: dict, decomposer, candidates: list[Candidate], linear: list,
                       latency, timer: Timer | None, *, opset: int | None, build: Callable[[], onnx.ModelProto], progress=None):
    """The measured selection as ``compress`` runs it; returns (model | None, the report's speed dict).

    ``original`` is the normalised model as ONNX Runtime runs it (timed as it is), ``linear`` the
    Gemm/MatMul candidates (:mod:`onnxfactor.linear`, timed alone first), ``latency`` the
    :class:`onnxfactor.config.LatencyConfig`, ``build`` rewrites a copy with every candidate's
    current chain. Per-layer timing (1), then the latency budget (3, with the guard when even the
    fastest model is slower) or the end-to-end guard (2). The model is the last one measured (a
    copy); None when no end-to-end measurement was asked for (the caller builds the final model).
    ``timer`` (default: ONNX Runtime) is wrapped by ``latency.timing_cache`` when one is given.
    """
    from onnxfactor.checks import require_loadable
    from onnxfactor.latency import OrtTimer
    from onnxfactor.linear import select_faster_linear
    from onnxfactor.timing_cache import cached_timer
    from onnxfactor.validation import make_inputs, resolve_providers

    providers = resolve_providers(latency.provider)
    timer = cached_timer(timer or OrtTimer(providers, latency.threads), latency.timing_cache, providers, latency.threads)
    cache = timer if latency.timing_cache is not None else None
    require_loadable(original, providers)
    feeds = make_inputs(original, shapes=input_shapes, seed=0).batches[0]
    speed = {"providers": providers, "threads": latency.threads, "margin": latency.margin}
    if cache is not None:
        speed["timing_cache"] = cache  # a live object: the report's JSON reads its final hit counts
    budget = latency.target_speedup is not None or latency.max_latency_ms is not None
    select_faster_linear(linear, timer, margin=latency.margin, opset=opset)
    if budget:
        levels = decomposer.budget_options(candidates, timer, opset)
        result, met = meet_budget(
            candidates, levels, build, original, feeds, timer,
            target_speedup=latency.target_speedup, max_latency_ms=latency.max_latency_ms,
        )
        goal = f"{latency.target_speedup:g}x" if latency.target_speedup is not None else f"{latency.max_latency_ms:g} ms"
        if not met:
            last = result.rounds[-1]
            speed["warning"] = (
                f"latency budget {goal} is out of reach: the fastest model found runs {last['compressed_ms']:.3g} ms "
                f"against {last['original_ms']:.3g} ms ({last['speedup']:.2f}x) with every useful layer at its fastest option"
            )
            if last["speedup"] < 1.0 and not latency.allow_slower:  # never slower: the guard rolls back
                guarded = guard_end_to_end(candidates, build, original, feeds, timer, margin=latency.margin)
                result.rounds += guarded.rounds
                result.model = guarded.model
        speed.update(budget=goal, budget_met=met, **result.to_dict())
        return result.model, speed
    select_faster_layers(candidates, timer, margin=latency.margin, opset=opset,
                         progress=(lambda d, n, name: progress(d, n, f"timing {name}")) if progress else None)
    if not latency.guard:
        return None, speed
    result = guard_end_to_end(  # the linear chains can be rolled back too
        [*candidates, *linear], build, original, feeds, timer, allow_slower=latency.allow_slower, margin=latency.margin
    )
    speed.update(result.to_dict())
    if result.speedup is not None and result.speedup < 1.0 + latency.margin and result.rounds[-1]["layers"]:
        speed["warning"] = f"the compressed model measured {result.speedup:.2f}x as fast as the original (kept: --allow-slower)"
    return result.model, speed
