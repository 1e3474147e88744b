"""The search's allocation and selection on synthetic sensitivity curves (no model, no ONNX Runtime)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxfactor.search.allocate import Option, best_under, brute_force, pareto_allocations
from onnxfactor.search.constraints import Constraints, violations
from onnxfactor.search.runner import SearchConfig, pick_winner, rounding, run_allocation


def _curves(rng, layers: int, options: int, integer: bool = True) -> dict:
    curves = {}
    for i in range(layers):
        full = float(rng.integers(50, 100))
        opts = [Option(f"L{i}", None, 0.0, {"macs": full, "params": full / 2, "bytes": full * 2})]
        for j in range(options):
            cost = float(rng.integers(1, int(full))) if integer else float(rng.uniform(1, full))
            opts.append(Option(f"L{i}", {"method": "tucker2", "ranks": {"out": j + 1}}, float(rng.uniform(0, 1)),
                               {"macs": cost, "params": cost / 2, "bytes": cost * 2}))
        curves[f"L{i}"] = opts
    return curves


@pytest.mark.parametrize("seed", range(25))
def test_pareto_front_equals_brute_force_for_every_cap(seed):
    rng = np.random.default_rng(seed)
    curves = _curves(rng, layers=int(rng.integers(1, 5)), options=int(rng.integers(1, 5)))
    front, exact = pareto_allocations(curves, key="macs")
    assert exact
    costs = [a.costs["macs"] for a in front]
    assert costs == sorted(costs) and [a.loss for a in front] == sorted((a.loss for a in front), reverse=True)
    total_full = sum(c[0].costs["macs"] for c in curves.values())
    for cap in np.linspace(0, total_full, 23):
        ours, reference = best_under(front, {"macs": cap}), brute_force(curves, {"macs": cap})
        if reference is None:
            assert ours is None
        else:
            assert ours.loss == pytest.approx(reference.loss, abs=1e-12) and ours.costs["macs"] <= cap


def test_a_thinned_front_says_it_is_approximate():
    curves = _curves(np.random.default_rng(0), layers=8, options=8, integer=False)
    front, exact = pareto_allocations(curves, key="macs", max_front=50)
    assert not exact and len(front) <= 50


class FakeExecutor:
    """Measures a layer spec from the synthetic curves: accuracy falls with the summed loss, latency with MACs."""

    def __init__(self, curves, noise_seed: int):
        self.index = {(n, repr(o.setting["ranks"])): o for n, opts in curves.items() for o in opts if o.setting}
        self.full = {n: opts[0] for n, opts in curves.items()}
        self.rng = np.random.default_rng(noise_seed)
        self.calls = 0

    def run(self, specs):
        out = []
        for spec in specs:
            self.calls += 1
            chosen = [self.index[(n, repr(r))] if r is not None else self.full[n] for n, r in spec["ranks"].items()]
            loss = sum(o.loss for o in chosen)
            macs = sum(o.costs["macs"] for o in chosen)
            out.append({"spec": spec, "accuracy": 0.93 - 0.01 * loss + self.rng.normal(0, 0.002), "accuracy_original": 0.93,
                        "agreement": 1 - 0.02 * loss, "rel_error": 0.1 * loss, "macs": macs, "macs_original": 1.0,
                        "params": sum(o.costs["params"] for o in chosen), "weight_bytes": sum(o.costs["bytes"] for o in chosen),
                        "latency_ms": 0.1 + macs / 100 * (1 + self.rng.normal(0, 0.05)), "speedup": None})
        return out


@pytest.mark.parametrize("seed", range(30))
def test_the_returned_candidate_never_violates_a_constraint(seed):
    rng = np.random.default_rng(seed)
    curves = _curves(rng, layers=int(rng.integers(2, 6)), options=int(rng.integers(2, 6)))
    full = sum(c[0].costs["macs"] for c in curves.values())
    constraints = Constraints(max_accuracy_drop=float(rng.choice([0.5, 1.0, 2.0, 5.0])),
                              max_macs=int(full * rng.uniform(0.3, 1.0)) if rng.random() < 0.5 else None,
                              min_agreement=float(rng.uniform(0.8, 0.99)) if rng.random() < 0.5 else None,
                              max_latency_ms=float(full / 100 * rng.uniform(0.3, 1.2)) if rng.random() < 0.5 else None)
    config = SearchConfig(constraints=constraints, objective=str(rng.choice(["latency", "macs", "params"])),
                          max_evaluations=int(rng.integers(2, 10)))
    executor = FakeExecutor(curves, seed)
    candidates, front, exact, _ = run_allocation(curves, {"params": 0, "bytes": 0, "macs": 0}, executor, config, jobs=int(rng.integers(1, 4)))
    assert executor.calls == len(candidates) <= config.max_evaluations
    assert all(row["macs"] <= constraints.max_macs for row in front) if constraints.max_macs else True
    winner = pick_winner(candidates, config.objective)
    feasible = [c for c in candidates if not violations(constraints, c)]
    if winner is None:
        assert not feasible
    else:
        assert violations(constraints, winner) == []
        value = {"latency": "latency_ms", "macs": "macs", "params": "params"}[config.objective]
        assert winner[value] == min(c[value] for c in feasible)


def test_the_latency_objective_compares_each_candidate_with_the_original_of_its_own_measurement():
    # b is slower in absolute ms, measured in a slow phase of the machine, but faster than the original timed beside it
    a = {"spec": "a", "violations": [], "latency_ms": 10.0, "latency_original_ms": 10.5, "accuracy": 0.9}
    b = {"spec": "b", "violations": [], "latency_ms": 11.0, "latency_original_ms": 14.0, "accuracy": 0.9}
    assert pick_winner([a, b], "latency")["spec"] == "b"
    assert pick_winner([dict(a, latency_original_ms=None), dict(b, latency_original_ms=None)], "latency")["spec"] == "a"


def test_violations_name_each_requirement():
    c = Constraints(max_accuracy_drop=0.5, min_agreement=0.99, max_weight_mb=1.0, target_speedup=1.5)
    m = {"accuracy": 0.92, "accuracy_original": 0.93, "agreement": 0.995, "weight_bytes": 2e6, "speedup": float("nan")}
    assert violations(c, m) == ["accuracy drop (points) 1 (> 0.5)", "weight MB 2 (> 1)", "measured speedup nan (< 1.5)"]
    assert violations(Constraints(max_params=10), {"params": None}) == ["parameters unknown (> 10)"]


def test_several_methods_make_one_front_with_a_method_per_layer():
    """``--methods tucker2,cp3``: the allocation runs over every layer's options of both methods, so
    its front is never worse (predicted loss at a cost) than either method's own front, and its
    specs name each layer's method (a rank file of ``{"method": ...}`` entries)."""
    from onnxfactor.search.space import MIXED, layer_spec

    rng = np.random.default_rng(3)
    curves = _curves(rng, layers=4, options=3)
    for name, opts in curves.items():  # a second method with its own (cost, loss) trade-off
        opts += [Option(name, {"method": "cp3", "ranks": {"rank": j + 1}}, float(rng.uniform(0, 1)),
                        {k: v * float(rng.uniform(0.3, 0.9)) for k, v in o.costs.items()}) for j, o in enumerate(opts[1:])]
    mixed, _ = pareto_allocations(curves, key="macs")
    assert any(len({o.setting["method"] for o in a.choice.values() if o.setting}) == 2 for a in mixed)  # methods do mix
    for method in ("tucker2", "cp3"):
        single, _ = pareto_allocations({n: [o for o in opts if o.setting is None or o.setting["method"] == method]
                                        for n, opts in curves.items()}, key="macs")
        for a in single:
            assert best_under(mixed, {"macs": a.costs["macs"]}).loss <= a.loss + 1e-12

    class Recorder:
        def __init__(self):
            self.specs = []

        def run(self, specs):
            self.specs += specs
            return [{"spec": s, "accuracy": 0.9, "accuracy_original": 0.9, "agreement": 1.0, "rel_error": 0.0, "macs": 1.0,
                     "macs_original": 2.0, "params": 1.0, "weight_bytes": 1.0, "latency_ms": 1.0, "speedup": None} for s in specs]

    recorder = Recorder()
    config = SearchConfig(constraints=Constraints(min_agreement=0.5), methods=("tucker2", "cp3"), max_evaluations=4)
    candidates, front, _, _ = run_allocation(curves, {"params": 0, "bytes": 0, "macs": 0}, recorder, config, jobs=2)
    assert candidates and {r["method"] for r in front} == {MIXED} and len(front) == len(mixed) - 1  # the all-keep point is no candidate
    for spec in recorder.specs:
        assert spec["method"] == MIXED
        entries = [e for e in spec["ranks"].values() if e is not None]
        assert entries and all(e["method"] in ("tucker2", "cp3") and len(e) == 2 for e in entries)
    a = mixed[len(mixed) // 2]
    assert layer_spec(MIXED, a.settings())["ranks"] == {n: (None if o.setting is None else {"method": o.setting["method"], **o.setting["ranks"]})
                                                        for n, o in sorted(a.choice.items())}


def test_the_default_rounding_follows_the_objective():
    """8 when the objective is measured latency (ONNX Runtime's blocked kernels), 1 when rounding up
    would only add what is minimised; an explicit value always wins."""
    assert rounding(SearchConfig()) == 8
    assert rounding(SearchConfig(objective="macs")) == rounding(SearchConfig(objective="params")) == 1
    assert rounding(SearchConfig(objective="params", round_to=16)) == 16
    assert rounding(SearchConfig(round_to=1)) == 1
