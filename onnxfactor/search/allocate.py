"""Global allocation: one option per layer, the least predicted loss at each total cost.

Each layer has a *sensitivity curve*: options (keep, or a method at some ranks), each with a
predicted loss (the layer's relative output error on the calibration data, data-aware and as
fitted, squared: errors of independent layers add roughly in energy) and its costs (MACs,
parameters). Choosing one option per layer to minimise the total loss under a cost cap is a
multiple-choice knapsack. :func:`pareto_allocations` solves it exactly for every cap at once: it
merges the layers' curves one at a time and keeps only the non-dominated (cost, loss) states, so
the result is the whole Pareto front of (total cost, total predicted loss); a state dominated
after merging a layer can never become optimal later (costs and losses only add). ``max_front``
thins a front that grows too large to the states nearest to evenly spaced costs (then the result
is approximate: reported by ``exact``). :func:`brute_force` is the reference the tests compare with.

The search (:mod:`onnxfactor.search.runner`) then walks this front, building and measuring real
models, because the additive prediction only orders the candidates: the measured accuracy and
latency decide.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Option:
    """One choice for one layer: ``setting`` (e.g. ``{"method": "tucker2", "ranks": {...}}``; None = keep)."""

    layer: str
    setting: dict | None
    loss: float
    costs: dict  # e.g. {"macs": ..., "params": ...}, this layer's own after the choice
    label: str = ""


@dataclass
class Allocation:
    """One point of the front: a choice per layer and its totals."""

    choice: dict[str, Option]
    loss: float
    costs: dict = field(default_factory=dict)

    def settings(self) -> dict[str, dict | None]:
        return {name: option.setting for name, option in self.choice.items()}


def _merge(front: list[tuple[float, float, tuple]], options: list[Option], key: str) -> list[tuple[float, float, tuple]]:
    states = [(c + o.costs[key], l + o.loss, picks + (i,)) for c, l, picks in front for i, o in enumerate(options)]
    states.sort(key=lambda s: (s[0], s[1]))
    kept, best = [], float("inf")
    for s in states:
        if s[1] < best:  # strictly better loss than every cheaper state
            kept.append(s)
            best = s[1]
    return kept


def _thin(front, max_front: int):
    if len(front) <= max_front:
        return front, True
    lo, hi = front[0][0], front[-1][0]
    targets = [lo + (hi - lo) * k / (max_front - 1) for k in range(max_front)]
    picked, j = [], 0
    for t in targets:
        while j + 1 < len(front) and abs(front[j + 1][0] - t) <= abs(front[j][0] - t):
            j += 1
        if not picked or picked[-1] is not front[j]:
            picked.append(front[j])
    return picked, False


def pareto_allocations(curves: dict[str, list[Option]], key: str = "macs", max_front: int = 5000) -> tuple[list[Allocation], bool]:
    """The Pareto front of (total ``key`` cost, total loss), cheapest first; and whether it is exact."""
    names = list(curves)
    front, exact = [(0.0, 0.0, ())], True
    for name in names:
        if not curves[name]:
            raise ValueError(f"layer {name!r} has no option")
        front = _merge(front, curves[name], key)
        front, ok = _thin(front, max_front)
        exact = exact and ok
    out = []
    for _, loss, picks in front:
        choice = {n: curves[n][i] for n, i in zip(names, picks)}
        costs = {k: sum(o.costs[k] for o in choice.values()) for k in next(iter(choice.values())).costs}
        out.append(Allocation(choice, loss, costs))
    return out, exact


def best_under(front: list[Allocation], caps: dict[str, float]) -> Allocation | None:
    """The least-loss allocation whose totals are within every cap (``{"params": 1e6}``), or None."""
    ok = [a for a in front if all(a.costs[k] <= v for k, v in caps.items())]
    return min(ok, key=lambda a: a.loss, default=None)


def brute_force(curves: dict[str, list[Option]], caps: dict[str, float]) -> Allocation | None:
    """Every combination (small problems only): the least-loss one within the caps."""
    names = list(curves)
    best = None
    for combo in itertools.product(*(curves[n] for n in names)):
        costs = {k: sum(o.costs[k] for o in combo) for k in combo[0].costs}
        if any(costs[k] > v for k, v in caps.items()):
            continue
        loss = sum(o.loss for o in combo)
        if best is None or loss < best.loss:
            best = Allocation(dict(zip(names, combo)), loss, costs)
    return best
