"""``onnxfactor search`` on the bundled model: allocation, grid, pool, Ray, cache, infeasible, plots."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest

from onnxfactor.config import CalibrationConfig, CompressConfig
from onnxfactor.errors import UsageError
from onnxfactor.validation.run import ValidationOptions
from onnxfactor.search import Constraints, SearchConfig, search
from onnxfactor.search.evaluate import Context, config_for
from onnxfactor.search.executor import Executor
from onnxfactor.search.space import grid_specs
from onnxfactor.validation.metric import TaskMetric
from tests.conftest import MODELS
from tests.integration.test_cli import assert_user_error, cli

MODEL = MODELS / "fashion_cnn.onnx"
CALIB = MODELS / "fashion_mnist_calib.npz"
BASE = CompressConfig(exclude=("/0/Conv",), calibration=CalibrationConfig(samples=256))
DETERMINISTIC = ("accuracy", "accuracy_original", "agreement", "task_metric", "rel_error", "macs", "params", "weight_bytes", "layers")
TOP1_METRIC = """
import numpy as np

def score(original, compressed):
    return original["logits"].argmax(1) == compressed["logits"].argmax(1)

def half(original, compressed):
    return 0.5
"""


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    path = tmp_path_factory.mktemp("search") / "held_out.npz"
    data = np.load(MODELS / "fashion_mnist_test.npz")
    np.savez(path, **{k: v[:300] for k, v in data.items()})
    return ValidationOptions(data=path)


def test_search_cli_meets_the_requirement_writes_report_plots_and_reuses_its_cache(tmp_path, held_out):
    args = ["search", MODEL, "out.onnx", "--calibration", CALIB, "--calibration-samples", "256", "--data", held_out.data,
            "--max-accuracy-drop", "1", "--exclude", "/0/Conv", "--fractions", "0.2,0.3,0.5", "--max-evaluations", "4",
            "--jobs", "1", "--latency-runs", "3", "--cache", "cache", "--report", "r.json", "--plots", "plots"]
    proc = cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    winner, out = report["winner"], report["output"]
    assert winner is not None and winner["violations"] == []
    assert 100 * (winner["accuracy_original"] - winner["accuracy"]) <= 1.0
    assert 1 <= len(report["candidates"]) <= 4 and report["exact_front"]
    # the latency objective's default rounding: every rank a multiple of 8 (the layers have >= 32 channels)
    assert report["config"]["round_to"] == 8
    ranks = [r for layer in winner["spec"]["ranks"].values() if layer for r in layer.values()]
    assert ranks and all(r % 8 == 0 for r in ranks), ranks
    assert {r["fraction"] for r in report["sensitivity"]} == {0.2, 0.3, 0.5}
    # the written model is the winner, built again: same ranks, same held-out accuracy
    assert out["validation"]["accuracy_compressed"] == pytest.approx(winner["accuracy"])
    assert out["conv_macs_ratio"] > 1.3 and "chosen" in proc.stdout
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)
    assert sorted(p.split("/")[-1] for p in report["plots"]) == ["accuracy_vs_rank.png", "chosen_ranks.png", "pareto.png", "sensitivity.png"]
    assert all((tmp_path / "plots" / n).stat().st_size > 5000 for n in ("pareto.png", "sensitivity.png"))
    # a rerun with a looser requirement evaluates nothing already measured
    looser = list(args)
    looser[looser.index("--max-accuracy-drop") + 1] = "3"
    proc = cli(*looser, "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    again = json.loads((tmp_path / "r.json").read_text())
    measured = {c["key"] for c in report["candidates"]}
    assert again["cache_hits"] >= 1 and all(c["cached"] == (c["key"] in measured) for c in again["candidates"])


def test_figures_have_the_expected_axes(tmp_path, held_out):
    from onnxfactor.search.plots import make_figures

    result = search(MODEL, CALIB, held_out, base=BASE, config=SearchConfig(
        constraints=Constraints(min_agreement=0.9), strategy="grid", fractions=(0.3, 0.5), weaken=(), grid_round_to=(1,),
        jobs=1, latency_runs=2)).to_dict()
    assert [c["spec"] for c in result["candidates"]] == grid_specs(("tucker2",), (0.3, 0.5), (), round_to=(1,))  # exactly the grid
    figures = make_figures(json.loads(json.dumps(result, default=str)))
    pareto = figures["pareto.png"].axes
    assert [a.get_xlabel() for a in pareto] == ["conv MAC compression (x)", "measured speedup (x)"]
    assert all(a.get_ylabel() == "held-out top-1 accuracy (%)" for a in pareto)
    assert "Pareto front" in [t.get_text() for t in pareto[0].get_legend().get_texts()]
    assert figures["accuracy_vs_rank.png"].axes[0].get_xlabel() == "rank fraction (global ratio setting)"
    line = figures["accuracy_vs_rank.png"].axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [0.3, 0.5]
    ranks = figures["chosen_ranks.png"].axes[0]
    assert ranks.get_ylabel() == "rank" and len(ranks.patches) >= 2


def test_pool_and_ray_return_the_same_candidates(tmp_path, held_out):
    import ray  # make test installs the [ray] extra: a missing Ray fails here, it is not skipped

    from onnxfactor import calibrate

    stats = calibrate(MODEL, CALIB, config=BASE)
    import pickle

    (tmp_path / "stats.pkl").write_bytes(pickle.dumps(stats))
    # a task metric (here top-1 agreement rewritten by hand) travels to the pool's and Ray's workers by path
    (tmp_path / "top1.py").write_text(TOP1_METRIC)
    held_out = dataclasses.replace(held_out, metric=TaskMetric(str(tmp_path / "top1.py")))
    ctx = Context(model=MODEL, base=BASE, held_out=held_out, stats_file=tmp_path / "stats.pkl", threads=1, latency_runs=1)
    specs = grid_specs(("tucker2",), (0.25, 0.5), (), round_to=(1,))
    serial = Executor(ctx, jobs=1).run(specs)
    with Executor(ctx, jobs=2) as pool:
        pooled = pool.run(specs)
    try:
        with Executor(ctx, jobs=2, ray_address="local") as remote:
            rayed = remote.run(specs)
    finally:
        ray.shutdown()
    assert len({r["worker"] for r in pooled}) == 2  # really two processes
    for a, b, c in zip(serial, pooled, rayed):
        assert a["spec"] == b["spec"] == c["spec"]
        assert {k: a[k] for k in DETERMINISTIC} == {k: b[k] for k in DETERMINISTIC} == {k: c[k] for k in DETERMINISTIC}
        assert a["task_metric"] == pytest.approx(a["agreement"], abs=1e-12) and 0.5 < a["task_metric"] < 1.0
    assert serial[0]["accuracy"] < serial[1]["accuracy"] + 0.02 and serial[0]["macs"] < serial[1]["macs"]


def test_infeasible_requirements_exit_7_without_a_model(tmp_path, held_out):
    common = ["--calibration", CALIB, "--calibration-samples", "128", "--data", held_out.data, "--exclude", "/0/Conv",
              "--fractions", "0.5", "--jobs", "1", "--latency-runs", "1"]
    proc = cli("search", MODEL, "out.onnx", *common, "--max-params", "1000", cwd=tmp_path)
    assert_user_error(proc, 7, "--max-params")
    proc = cli("search", MODEL, "out.onnx", *common, "--min-agreement", "1.0", "--max-evaluations", "2", "--report", "r.json", cwd=tmp_path)
    assert_user_error(proc, 7, "top-1 agreement")
    (tmp_path / "metric.py").write_text(TOP1_METRIC)
    proc = cli("search", MODEL, "out.onnx", *common, "--metric", "metric.py:half", "--min-agreement", "0.9", "--max-evaluations", "1",
               cwd=tmp_path)
    assert_user_error(proc, 7, "task metric 0.5 (< 0.9)")
    assert not (tmp_path / "out.onnx").exists()
    assert json.loads((tmp_path / "r.json").read_text())["winner"] is None
    proc = cli("search", MODEL, "best.onnx", *common, "--min-agreement", "1.0", "--max-evaluations", "1", "--write-best", cwd=tmp_path)
    assert proc.returncode == 7 and (tmp_path / "best.onnx").exists()
    # usage errors: no requirement, no labels for --max-accuracy-drop, bad duration, bad method
    np.savez(tmp_path / "nolabels.npz", input=np.load(held_out.data)["input"][:50])
    assert_user_error(cli("search", MODEL, "o.onnx", *common, cwd=tmp_path), 2, "requirement")
    assert_user_error(cli("search", MODEL, "o.onnx", *common[:4], "--data", "nolabels.npz", "--max-accuracy-drop", "1", cwd=tmp_path),
                      2, "labels")
    assert_user_error(cli("search", MODEL, "o.onnx", *common, "--min-agreement", "0.9", "--time-budget", "soon", cwd=tmp_path), 2, "duration")
    assert_user_error(cli("search", MODEL, "o.onnx", *common, "--min-agreement", "0.9", "--methods", "svd2", cwd=tmp_path), 2, "svd2")
    assert_user_error(cli("search", MODEL, "o.onnx", "--calibration", held_out.data, "--data", held_out.data, "--min-agreement", "0.9",
                          cwd=tmp_path), 2, "--allow-overlap")


def test_config_for_builds_rank_files_and_global_settings(tmp_path):
    layers = config_for({"kind": "layers", "method": "tucker2", "ranks": {"/2/Conv": {"out": 8, "in": 8}, "/5/Conv": None}}, BASE, tmp_path)
    assert layers.ranks.policy == "file" and json.loads(layers.ranks.rank_file.read_text()) == {"/2/Conv": {"out": 8, "in": 8}}
    mixed = config_for({"kind": "layers", "method": "mixed", "ranks": {"/2/Conv": {"method": "cp3", "rank": 9}, "/5/Conv": None}}, BASE, tmp_path)
    assert mixed.method == "tucker2" and json.loads(mixed.ranks.rank_file.read_text()) == {"/2/Conv": {"method": "cp3", "rank": 9}}
    grid = config_for({"kind": "global", "method": "cp3", "policy": "weakened", "value": 0.3, "round_to": 8}, BASE, tmp_path)
    assert (grid.method, grid.ranks.policy, grid.ranks.weaken, grid.ranks.round_to, grid.exclude) == ("cp3", "weakened", 0.3, 8, ("/0/Conv",))


def test_sensitivity_curves_cover_linear_layers_with_include_linear():
    import dataclasses

    from onnxfactor.search.space import sensitivity

    curves, rows, totals = sensitivity(MODEL, None, dataclasses.replace(BASE, include_linear=True), fractions=(0.25, 0.5))
    assert {"/16/Gemm", "/18/Gemm"} <= set(curves) and "/0/Conv" not in curves
    gemm = [r for r in rows if r["layer"] == "/16/Gemm"]
    assert [r["fraction"] for r in gemm] == [0.25, 0.5] and gemm[0]["output_error"] > gemm[1]["output_error"] > 0
    assert curves["/16/Gemm"][0].setting is None and curves["/16/Gemm"][0].loss == 0.0  # keep
    assert totals.linear_macs_before == sum(curves[n][0].costs["macs"] for n in ("/16/Gemm", "/18/Gemm"))
    conv_only, _, _ = sensitivity(MODEL, None, BASE, fractions=(0.5,))
    assert not any(name.endswith("Gemm") for name in conv_only)


def test_layer_timing_costs_come_from_the_timer_and_change_the_front():
    """``--layer-timing``: each (layer, fraction) chain is timed against its Conv; the allocation over
    measured ms drops chains that save MACs but not time (a fake timer whose nodes cost 2 ms each)."""
    from onnxfactor import calibrate
    from onnxfactor.latency import FakeTimer, macs_cost
    from onnxfactor.search.allocate import pareto_allocations
    from onnxfactor.search.space import sensitivity

    def cost(model):
        return macs_cost(model, per_mac_ms=1e-6, per_node_ms=2.0)

    stats = calibrate(MODEL, CALIB, config=BASE)
    timer = FakeTimer(cost=cost)
    curves, rows, _ = sensitivity(MODEL, stats, BASE, fractions=(0.3, 0.6), timer=timer)
    assert len(timer.calls) == len(rows) > 0  # one timing per (layer, fraction) that would decompose
    assert [r["chain_ms"] for r in rows] == pytest.approx([cost(b) for _, b, _ in timer.calls])
    assert [r["original_ms"] for r in rows] == pytest.approx([cost(a) for a, _, _ in timer.calls])
    for name, options in curves.items():
        keep = options[0]
        assert keep.setting is None and keep.costs["ms"] == pytest.approx(next(r["original_ms"] for r in rows if r["layer"] == name))
    slower = {n for n, opts in curves.items() if all(o.costs["ms"] >= opts[0].costs["ms"] for o in opts[1:])}
    assert slower and slower != set(curves)  # some chains save MACs but cost time under this timer, others not
    cheapest_ms = pareto_allocations(curves, key="ms")[0][0]
    cheapest_macs = pareto_allocations(curves, key="macs")[0][0]
    assert not any(cheapest_ms.choice[n].setting for n in slower)  # the ms front never takes a chain slower than its Conv
    assert any(cheapest_macs.choice[n].setting for n in slower)    # the MACs front does
    assert cheapest_ms.costs["ms"] < cheapest_macs.costs["ms"]


def test_layer_timing_falls_back_to_macs_when_nothing_can_be_timed():
    from onnxfactor import calibrate
    from onnxfactor.search.space import sensitivity

    class Broken:
        def time_pair(self, a, b, feeds):
            raise RuntimeError("provider cannot run this node alone")

    stats = calibrate(MODEL, CALIB, config=BASE)
    curves, rows, _ = sensitivity(MODEL, stats, BASE, fractions=(0.5,), timer=Broken())
    assert rows and all(r["chain_ms"] is None for r in rows)
    assert all(o.costs["ms"] == pytest.approx(o.costs["macs"] * 1e-6) for opts in curves.values() for o in opts)


def test_network_sensitivity_judges_each_option_with_that_layer_alone_decomposed():
    """``--sensitivity network``: every option's loss is the network's squared worst output error with
    only that layer's chain spliced into the original, on the statistics' first 32 kept samples; the figure
    equals the error of a model compressed at that layer alone (same ranks, same fit), measured
    independently; the splice reproduces that model's outputs."""
    from onnxfactor import calibrate, compress
    from onnxfactor.config import RankConfig
    from onnxfactor.search.network import network_sensitivity, splice
    from onnxfactor.search.space import sensitivity
    from tests.conftest import rel_l2, run_ort

    stats = calibrate(MODEL, CALIB, config=BASE)
    curves, rows, _ = sensitivity(MODEL, stats, BASE, fractions=(0.3, 0.6))
    layer_losses = {(o.layer, o.label): o.loss for opts in curves.values() for o in opts}
    summary = network_sensitivity(curves, rows, MODEL, stats, BASE, methods=("tucker2",), fractions=(0.3, 0.6), round_to=1, samples=32)
    assert summary["samples"] == 32 and summary["spliced"] == summary["options"] == len(rows) > 0 and not summary["unmeasured"]
    assert all(r["network_error"] is not None and 0 < r["network_error"] < 2 for r in rows)
    for name, options in curves.items():
        assert options[0].setting is None and options[0].loss == 0.0
        for o in options[1:]:
            row = next(r for r in rows if r["layer"] == name and r["ranks"] == o.setting["ranks"])
            assert o.loss == pytest.approx(row["network_error"] ** 2)
    assert any(abs(o.loss - layer_losses[(o.layer, o.label)]) > 1e-3 for opts in curves.values() for o in opts[1:])
    # independently: /7/Conv alone at ratio 0.3, no correction, on the same 32 calibration images
    row = next(r for r in rows if r["layer"] == "/7/Conv" and r["fraction"] == 0.3)
    config = dataclasses.replace(BASE, nodes=("/7/Conv",), ranks=RankConfig(policy="ratio", ratio=0.3), latency=None,
                                 calibration=dataclasses.replace(BASE.calibration, correct=False))
    alone, report = compress(MODEL, config=config, calibration=stats)
    assert [l.ranks for l in report.decomposed] == [row["ranks"]]
    x = {"input": np.concatenate([c.feeds["input"] for c in stats.cache])[:32]}  # the samples the statistics kept
    original = onnx.load(MODEL)
    assert rel_l2(run_ort(original, x)[0], run_ort(alone, x)[0]) == pytest.approx(row["network_error"], rel=1e-4)
    everything, full_report = compress(MODEL, config=dataclasses.replace(config, nodes=()), calibration=stats)
    layer = next(l for l in full_report.decomposed if l.name == "/7/Conv")
    spliced, index = splice(original, everything, layer)
    assert original.graph.node[index].op_type == "Conv" and original.graph.node[index].name == "/7/Conv"
    onnx.checker.check_model(spliced)
    assert rel_l2(run_ort(spliced, x)[0], run_ort(alone, x)[0]) < 1e-5


def test_search_with_network_sensitivity_reports_it_and_refuses_an_unknown_mode(tmp_path, held_out):
    config = SearchConfig(constraints=Constraints(max_accuracy_drop=2.0), sensitivity="network", sensitivity_samples=16,
                          fractions=(0.3, 0.6), jobs=1, max_evaluations=2, latency_runs=1)
    result = search(MODEL, CALIB, held_out, config=config, base=BASE)
    assert result.network_sensitivity["samples"] == 16 and result.network_sensitivity["spliced"] > 0
    assert result.config["sensitivity"] == "network" and "network_sensitivity" in result.seconds
    assert all(r.get("network_error") is not None for r in result.sensitivity)
    assert result.winner is not None and not result.winner["violations"]
    common = ["--calibration", CALIB, "--data", held_out.data, "--min-agreement", "0.9", "--jobs", "1"]
    proc = cli("search", MODEL, "o.onnx", *common, "--sensitivity", "task", cwd=tmp_path)  # typer's own choice check
    assert proc.returncode == 2 and "'task' is not one of 'layer', 'network'" in proc.stderr
    with pytest.raises(UsageError, match="--sensitivity"):
        search(MODEL, CALIB, held_out, config=dataclasses.replace(config, sensitivity="task"), base=BASE)
