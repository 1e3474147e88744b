"""Compression with calibration data: exactness, data-aware fits, correction, reconstruction, real models."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfactor import CompressConfig, RankConfig, compress
from onnxfactor.config import CalibrationConfig
from onnxfactor.errors import UsageError
from tests.conftest import MODELS, full_rank_entry, make_conv_model, rel_l2, run_ort
from tests.integration.test_full_rank_exactness import CASES

ort = pytest.importorskip("onnxruntime")

CALIB = MODELS / "fashion_mnist_calib.npz"
TEST = MODELS / "fashion_mnist_test.npz"


def _input_shape(model: onnx.ModelProto) -> list[int]:
    return [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]


def _feeds(model: onnx.ModelProto, count: int, seed: int, transform=None) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        x = rng.standard_normal(_input_shape(model)).astype(np.float32)
        out.append({"x": transform(x) if transform else x})
    return out


@pytest.mark.parametrize("kwargs", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_full_rank_data_fit_and_correction_are_exact(kwargs, full_rank_config):
    """At full rank the data-aware fit (whitening, response basis, bias correction) and the
    sequential correction reproduce the original in ONNX Runtime, on every Conv configuration."""
    model = make_conv_model(**kwargs)
    weight_shape = tuple(model.graph.initializer[0].dims)
    config = full_rank_config({"conv": full_rank_entry(weight_shape, kwargs.get("group", 1))})
    config = dataclasses.replace(config, calibration=CalibrationConfig(fit="data", correct=True))
    # inputs with correlated, unequal channels and a mean: whitening and bias correction do something
    mix = np.random.default_rng(5).standard_normal((weight_shape[1] * kwargs.get("group", 1),) * 2)
    shift = lambda x: np.einsum("ij,nj...->ni...", mix, x).astype(np.float32) + 0.5  # noqa: E731
    compressed, report = compress(model, config=config, calibration=_feeds(model, 6, 0, shift))
    layer = report.layers[0]
    assert (layer.status, layer.fit) == ("decomposed", "data")
    assert layer.output_error < 1e-4
    assert layer.correction is not None and layer.correction["error_after"] < 1e-4
    onnx.checker.check_model(compressed, full_check=True)
    feeds = _feeds(model, 1, 9, shift)[0]
    (expected,), (got,) = run_ort(model, feeds), run_ort(compressed, feeds)
    assert rel_l2(expected, got) <= 1e-4


@pytest.mark.parametrize("case", ["k3", "asym_pads_strided", "same_lower", "dilation", "group2", "conv1d_strided_dilated", "conv3d_strided_asym"])
def test_full_rank_input_only_chain_correction_is_exact(case, full_rank_config):
    """The correction of an input-only Tucker-2 chain refits its last conv, the k x k core, from
    im2col features (padding, strides, dilations, groups): exact at full rank too."""
    kwargs = dict(CASES)[case]
    model = make_conv_model(**kwargs)
    weight_shape = tuple(model.graph.initializer[0].dims)
    config = full_rank_config({"conv": {"out": None, "in": weight_shape[1]}})
    config = dataclasses.replace(config, calibration=CalibrationConfig(fit="data", correct=True))
    compressed, report = compress(model, config=config, calibration=_feeds(model, 6, 0))
    layer = report.layers[0]
    assert layer.ranks == {"out": None, "in": weight_shape[1]} and len(layer.new_nodes) == 2
    assert layer.correction["error_after"] < 1e-4
    feeds = _feeds(model, 1, 9)[0]
    assert rel_l2(run_ort(model, feeds)[0], run_ort(compressed, feeds)[0]) <= 1e-4


def test_inputs_in_a_channel_subspace_need_only_that_rank():
    """Inputs living in a 4-dimensional subspace of 16 channels: the data-aware input factor of
    rank 4 loses (almost) nothing of the output, the weight-only one most of it."""
    model = make_conv_model(c_in=16, c_out=12, kernel=(3, 3), pads=(1, 1, 1, 1), spatial=(10, 10))
    basis = np.random.default_rng(7).standard_normal((16, 4))

    def subspace(x):  # project every pixel's 16 channels onto the 4-dim column space of `basis`
        return np.einsum("ij,nj...->ni...", basis, x[:, :4]).astype(np.float32)

    calibration = _feeds(model, 16, 0, subspace)
    held_out = _feeds(model, 4, 1, subspace)
    errors = {}
    for fit in ("weights", "data"):
        config = CompressConfig(ranks=RankConfig(policy="file"), min_reduction=None,
                                calibration=CalibrationConfig(fit=fit, correct=False))
        import tempfile, pathlib

        with tempfile.TemporaryDirectory() as tmp:
            path = pathlib.Path(tmp) / "ranks.json"
            path.write_text(json.dumps({"conv": {"out": None, "in": 4}}))
            config = dataclasses.replace(config, ranks=RankConfig(policy="file", rank_file=path))
            compressed, report = compress(model, config=config, calibration=calibration)
        got = [run_ort(compressed, f)[0] for f in held_out]
        expected = [run_ort(model, f)[0] for f in held_out]
        errors[fit] = rel_l2(np.stack(expected), np.stack(got))
        assert report.layers[0].ranks == {"out": None, "in": 4}
        assert report.layers[0].output_error == pytest.approx(errors[fit], rel=0.1, abs=1e-3)
    assert errors["data"] < 1e-2
    assert errors["weights"] > 0.3


def _accuracy(model: onnx.ModelProto) -> float:
    data = np.load(TEST)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    pred = np.concatenate([session.run(None, {"input": data["input"][i : i + 500]})[0].argmax(1) for i in range(0, 1000, 500)])
    return float(np.mean(pred == data["labels"]))


@pytest.fixture(scope="module")
def bundled_results():
    """fashion_cnn at 30 % of every full rank (5.7x fewer conv MACs), first conv excluded:
    weight-only, data-aware, data-aware + correction; 256 calibration (train) images."""
    model = MODELS / "fashion_cnn.onnx"
    out = {"original": _accuracy(onnx.load(model))}
    for name, calibration, fit, correct in (("weights", None, "weights", False), ("data", CALIB, "data", False),
                                            ("data+correct", CALIB, "data", True)):
        config = CompressConfig(ranks=RankConfig(policy="ratio", ratio=0.3), exclude=("/0/Conv",),
                                calibration=CalibrationConfig(fit=fit, correct=correct, samples=256))
        compressed, report = compress(model, config=config, calibration=calibration)
        out[name] = (_accuracy(compressed), report)
    return out


def test_bundled_model_data_fit_beats_weight_fit_at_the_same_ranks(bundled_results):
    """Measured on the 1000 bundled test images (disjoint from the calibration train images):
    original 93.9 %, weight-only 63.9 %, data-aware 85.7 %, + correction 90.9 % (at 1000
    calibration images: 85.5 / 91.2 %)."""
    r = bundled_results
    weights, data, corrected = r["weights"][0], r["data"][0], r["data+correct"][0]
    ranks = [[l.ranks for l in r[k][1].layers] for k in ("weights", "data", "data+correct")]
    assert ranks[0] == ranks[1] == ranks[2]  # same ranks: only the fit differs
    assert r["weights"][1].totals.conv_macs_ratio > 5.0
    assert data >= weights + 0.15
    assert corrected >= data + 0.03
    assert corrected >= r["original"] - 0.05


def test_bundled_model_report_records_fit_errors_and_correction(bundled_results):
    _, report = bundled_results["data+correct"]
    decomposed = report.decomposed
    assert len(decomposed) == 5
    assert all(l.fit == "data" and 0 < l.output_error < 0.6 for l in decomposed)
    assert all(l.correction["stage"] == i for i, l in enumerate(decomposed))
    applied = [l.correction for l in decomposed if l.correction["applied"]]
    assert applied and all(c["held_out_after"] < c["held_out_before"] for c in applied)
    assert report.calibration["samples"] == 256 and report.calibration["correction"]["stages"] == 5
    e2e = report.calibration["correction"]["end_to_end"]  # the whole correction, judged on the held-out samples
    # measured: worst output error on the 25 held-out samples 0.476 -> 0.336
    assert e2e["applied"] and e2e["samples"] == 25 and e2e["held_out_error_after"] < 0.8 * e2e["held_out_error_before"]
    weights_report = bundled_results["weights"][1]
    assert weights_report.calibration is None and all(l.output_error is None for l in weights_report.layers)


def test_correction_that_worsens_the_network_output_is_reverted(monkeypatch):
    """Every layer's correction accepted on its own, the network's output worse after each pass:
    every pass is undone and all chains go back to their fit."""
    from onnxfactor.calibration import correct as correct_module

    real_refit = correct_module.refit

    def harmful(chain, sums, ridge, bias):
        chain, info = real_refit(chain, sums, ridge, bias)
        return dataclasses.replace(chain, bias=np.asarray(chain.bias) + 3.0), info  # a large shift of every output

    monkeypatch.setattr(correct_module, "refit", harmful)
    model = MODELS / "fashion_cnn.onnx"
    config = CompressConfig(ranks=RankConfig(policy="ratio", ratio=0.3), exclude=("/0/Conv",), calibration=CalibrationConfig(samples=64))
    x = np.load(CALIB)["input"]
    calib = [{"input": x[i : i + 16]} for i in range(0, 64, 16)]
    reverted, report = compress(model, config=config, calibration=calib)
    e2e = report.calibration["correction"]["end_to_end"]
    assert not e2e["applied"] and e2e["held_out_error_after"] == e2e["held_out_error_before"]
    assert e2e["reverted_layers"] == [l.name for l in report.decomposed]
    assert all(err > e2e["held_out_error_before"] for err in e2e["stage_errors"])
    assert e2e["checks"] == len(report.decomposed)  # one pass per layer here: nothing to bisect
    assert all(l.correction["reverted"] for l in report.decomposed)
    monkeypatch.setattr(correct_module, "refit", real_refit)
    uncorrected, _ = compress(model, config=dataclasses.replace(config, calibration=CalibrationConfig(samples=64, correct=False)),
                              calibration=calib)
    feeds = {"input": x[64:96]}
    np.testing.assert_allclose(run_ort(reverted, feeds)[0], run_ort(uncorrected, feeds)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("passes", [0, 1])
def test_only_the_layer_that_worsens_the_network_output_is_undone(monkeypatch, passes):
    """One layer's correction shifts its outputs (harmful), the others are ordinary: that layer
    alone is undone, the rest stay, and the held-out error ends below where it started -- with
    one pass per layer, and with all five in one pass, which the judge bisects (5 checks: all,
    the first three, the first two, the third, the last two)."""
    from onnxfactor.calibration import correct as correct_module

    real_refit = correct_module.refit
    calls = []

    def third_harmful(chain, sums, ridge, bias):
        chain, info = real_refit(chain, sums, ridge, bias)
        calls.append(1)
        return (dataclasses.replace(chain, bias=np.asarray(chain.bias) + 3.0) if len(calls) == 3 else chain), info

    monkeypatch.setattr(correct_module, "refit", third_harmful)
    config = CompressConfig(ranks=RankConfig(policy="ratio", ratio=0.3), exclude=("/0/Conv",),
                            calibration=CalibrationConfig(samples=64, stages=passes))
    x = np.load(CALIB)["input"]
    _, report = compress(MODELS / "fashion_cnn.onnx", config=config, calibration=[{"input": x[i : i + 16]} for i in range(0, 64, 16)])
    e2e = report.calibration["correction"]["end_to_end"]
    names = [l.name for l in report.decomposed]
    assert len(names) == 5 and e2e["reverted_layers"] == [names[2]] and e2e["applied"] and e2e["checks"] == 5
    if passes == 0:
        assert e2e["stage_errors"][2] > e2e["stage_errors"][1] and e2e["stage_errors"][3] <= e2e["stage_errors"][1]
    assert e2e["held_out_error_after"] < e2e["held_out_error_before"]
    assert [bool(l.correction.get("reverted")) for l in report.decomposed] == [False, False, True, False, False]


def test_a_grouped_pass_sees_its_own_layers_as_the_original_convs(monkeypatch):
    """In a pass of several layers, the chains run beside the original Convs, which compute the
    layers' outputs: the pass model's graph outputs are the original's (to float rounding) while
    the compressed model's are not, and each chain's side output is the chain on the original input."""
    from onnxfactor.calibration import correct as correct_module

    seen = []
    real_pass_model = correct_module.pass_model

    def spy(model, original, group, nodes, calibration):
        out = real_pass_model(model, original, group, nodes, calibration)
        seen.append((onnx.ModelProto.FromString(model.SerializeToString()), out, onnx.ModelProto.FromString(original.SerializeToString()),
                     [calibration.layers[c.site.name].output_name for c in group]))
        return out

    monkeypatch.setattr(correct_module, "pass_model", spy)
    config = CompressConfig(ranks=RankConfig(policy="ratio", ratio=0.3), exclude=("/0/Conv",), calibration=CalibrationConfig(samples=64, stages=1))
    x = np.load(CALIB)["input"]
    compress(MODELS / "fashion_cnn.onnx", config=config, calibration=[{"input": x[i : i + 16]} for i in range(0, 64, 16)])
    assert len(seen) == 1
    compressed, passing, original, outputs = seen[0]
    assert len(outputs) == 5 and sum(n.name.endswith(correct_module.SIDE) for n in passing.graph.node) == 5
    onnx.checker.check_model(passing)
    feeds = {"input": x[64:96]}
    reference, ours, theirs = run_ort(original, feeds)[0], run_ort(passing, feeds)[0], run_ort(compressed, feeds)[0]
    assert rel_l2(ours, reference) < 1e-5 and rel_l2(theirs, reference) > 0.05
    # the last layer's chain, beside its Conv, sees the original input: its side output is the
    # compressed layer's output on exact inputs, closer to the original's than the compressed model's
    exposed = onnx.ModelProto.FromString(passing.SerializeToString())
    exposed.graph.output.extend([onnx.ValueInfoProto(name=outputs[-1] + correct_module.SIDE), onnx.ValueInfoProto(name=outputs[-1])])
    side, exact = run_ort(exposed, feeds)[1:]
    probe = onnx.ModelProto.FromString(compressed.SerializeToString())
    probe.graph.output.extend([onnx.ValueInfoProto(name=outputs[-1])])
    drifted = run_ort(probe, feeds)[1]
    assert rel_l2(side, exact) < rel_l2(drifted, exact)


def test_error_policy_with_calibration_meets_the_measured_output_error():
    """Every layer's measured output error meets the target; the cheapest such chains here are
    input-only Tucker-2 chains, whose k x k core the correction refits (measured on the held-out
    correction samples: 0.121 -> 0.078 on the first, 0.159 -> 0.138, ..., 0.195 -> 0.191 on the last)."""
    config = CompressConfig(ranks=RankConfig(policy="error", target_error=0.15), exclude=("/0/Conv",),
                            calibration=CalibrationConfig(samples=128))
    _, report = compress(MODELS / "fashion_cnn.onnx", config=config, calibration=CALIB)
    decomposed = report.decomposed
    assert len(decomposed) >= 4
    for layer in decomposed:
        assert layer.output_error <= 0.15
        assert "output error <= 0.15 on the calibration data" in layer.modes[0]["note"]
        assert any(c.get("note", "").startswith("measured") for c in layer.candidates)
    cores = [l for l in decomposed if l.ranks["out"] is None]
    assert len(cores) >= 3
    applied = [l.correction for l in cores if l.correction["applied"]]
    assert len(applied) >= 3 and all(c["held_out_after"] < c["held_out_before"] for c in applied)
    assert max(c["held_out_before"] - c["held_out_after"] for c in applied) > 0.03


def _if_model() -> onnx.ModelProto:
    """A main-graph Conv followed by an If whose branches each hold a Conv."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), "w")

    def branch(name):
        wb = numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), f"{name}_w")
        node = helper.make_node("Conv", ["a", f"{name}_w"], [f"{name}_y"], name=f"{name}_conv", pads=[1, 1, 1, 1])
        return helper.make_graph([node], name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, 8, 6, 6])], initializer=[wb])

    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], name="main_conv", pads=[1, 1, 1, 1]),
        helper.make_node("ReduceSum", ["a"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["y"], name="if", then_branch=branch("then"), else_branch=branch("else")),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])],
                              initializer=[w, numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_convs_inside_if_keep_the_weight_fit_with_the_reason():
    model = _if_model()
    config = CompressConfig(ranks=RankConfig(policy="ratio", ratio=0.5), min_reduction=None)
    compressed, report = compress(model, config=config, calibration=_feeds(model, 4, 0))
    by_name = {l.name: l for l in report.layers}
    assert by_name["main_conv"].fit == "data" and by_name["main_conv"].output_error is not None
    for name in ("then_conv", "else_conv"):
        assert by_name[name].fit == "weights"
        assert "control-flow subgraph" in by_name[name].fit_note
        assert by_name[name].status == "decomposed"
    onnx.checker.check_model(compressed, full_check=True)
    x = _feeds(model, 1, 3)[0]
    assert run_ort(compressed, x)[0].shape == run_ort(model, x)[0].shape


def test_reconstruction_lowers_the_held_out_loss():
    pytest.importorskip("torch")
    config = CompressConfig(ranks=RankConfig(policy="ratio", ratio=0.3), exclude=("/0/Conv",),
                            calibration=CalibrationConfig(samples=128, reconstruct_steps=60, reconstruct_lr=1e-3))
    compressed, report = compress(MODELS / "fashion_cnn.onnx", config=config, calibration=CALIB)
    recon = [l.reconstruction for l in report.decomposed]
    assert len(recon) == 5 and all(r["steps"] == 60 for r in recon)
    assert all(r["held_out_loss_after"] <= r["held_out_loss_before"] for r in recon)
    assert sum(r["applied"] for r in recon) >= 3
    assert _accuracy(compressed) > 0.85


def test_reconstruction_without_torch_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    config = CompressConfig(calibration=CalibrationConfig(reconstruct_steps=10))
    with pytest.raises(UsageError, match=r"pip install 'onnxfactor\[finetune\]'") as e:
        compress(MODELS / "fashion_cnn.onnx", config=config, calibration=CALIB)
    assert "\n" not in str(e.value)


def test_calibration_data_that_does_not_fit_is_a_usage_error():
    model = make_conv_model()
    bad = [{"x": np.full(_input_shape(model), np.nan, np.float32)}]
    with pytest.raises(UsageError, match="NaN"):
        compress(model, calibration=bad)
    with pytest.raises(UsageError, match="--fit"):
        compress(model, config=CompressConfig(calibration=CalibrationConfig(fit="both")), calibration=_feeds(model, 1, 0))


def test_measured_selection_then_correction_of_the_layers_it_kept():
    """With --measure: layers the (fake) timer calls slower stay original and are not corrected;
    the correction runs on the final choice and its weights are what the model computes."""
    from onnxfactor.config import LatencyConfig
    from onnxfactor.latency import FakeTimer
    from tests.unit.test_speed import conv_cost, two_conv_model

    model = two_conv_model()
    cost = conv_cost({"convA": 10.0, "convB": 1.0}, chain_ms=1.0)  # convB's chain (3 convs) is slower
    config = CompressConfig(latency=LatencyConfig(rank_search=False), calibration=CalibrationConfig(fit="data"))
    compressed, report = compress(model, config=config, timer=FakeTimer(cost), calibration=_feeds(model, 8, 0))
    by_name = {l.name: l for l in report.layers}
    assert by_name["convA"].status == "decomposed" and by_name["convA"].correction["applied"] in (True, False)
    assert "error_after" in by_name["convA"].correction
    assert by_name["convB"].status == "kept" and by_name["convB"].reason.startswith("measured not faster")
    assert by_name["convB"].correction is None
    assert [n.name for n in compressed.graph.node if n.op_type == "Conv"][-1] == "convB"
    feeds = _feeds(model, 1, 5)[0]
    assert rel_l2(run_ort(model, feeds)[0], run_ort(compressed, feeds)[0]) < 0.05


@pytest.mark.parametrize("batch", ["dynamic", 5])
def test_end_to_end_check_runs_the_held_out_rows_alone_when_the_batch_allows(batch):
    """Five samples per chunk, one held out in each: a dynamic batch is cut to that row (the
    reference outputs are the model's on it alone), a fixed batch of 5 runs whole; the error of
    the original against itself is 0 either way, and of a perturbed copy the same figure."""
    from types import SimpleNamespace

    from onnxfactor.calibration.correct import _EndToEnd

    model = make_conv_model(batch=5)
    if batch == "dynamic":
        for value in (*model.graph.input, *model.graph.output):
            value.type.tensor_type.shape.dim[0].dim_param = "N"
    rng = np.random.default_rng(0)
    chunks = [SimpleNamespace(samples=np.arange(5 * i, 5 * i + 5), feeds={"x": rng.standard_normal((5, 8, 11, 13)).astype(np.float32)})
              for i in range(3)]
    held_out = {4, 9, 14}
    check = _EndToEnd(model, SimpleNamespace(cache=chunks), held_out, ["CPUExecutionProvider"])
    assert check.samples == 3
    assert [len(next(iter(feeds.values()))) for feeds, _, _ in check.chunks] == ([1, 1, 1] if batch == "dynamic" else [5, 5, 5])
    assert check.error(model) == 0.0
    perturbed = onnx.ModelProto.FromString(model.SerializeToString())
    w = perturbed.graph.initializer[0]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.1, w.name))
    expected = rel_l2(np.concatenate([run_ort(model, {"x": c.feeds["x"]})[0][4:5] for c in chunks]),
                      np.concatenate([run_ort(perturbed, {"x": c.feeds["x"][4:5]})[0] if batch == "dynamic"
                                      else run_ort(perturbed, c.feeds)[0][4:5] for c in chunks]))
    assert check.error(perturbed) == pytest.approx(expected, rel=1e-4) and expected > 0.05


@pytest.mark.parametrize("case", ["residual", "fashion_vgg_wide"])
def test_correction_from_the_cuts_equals_the_correction_from_the_inputs(monkeypatch, case):
    """Each pass and check of the correction starts at the cut before its layers (calibration.segments):
    the same chains, the same decisions and the same model as when every run starts at the inputs,
    on a model with a skip, a concat and a second input read at the end, and on a bundled model;
    the cuts did move (the saving is measured by tools/bench_calibration_cost.py)."""
    from onnxfactor.calibration import correct as correct_module
    from tests.unit.test_segments import _feeds as residual_feeds, residual_model

    if case == "residual":
        model, calib = residual_model(), residual_feeds(20, seed=3)
        held = residual_feeds(4, seed=9)
        config = CompressConfig(ranks=RankConfig(policy="ratio", ratio=0.4), calibration=CalibrationConfig(samples=40, stages=0))
    else:
        model = onnx.load(MODELS / "fashion_vgg_wide.onnx")
        x = np.load(CALIB)["input"]
        calib, held = [{"input": x[i : i + 16]} for i in range(0, 128, 16)], [{"input": np.load(TEST)["input"][:64]}]
        config = CompressConfig(ranks=RankConfig(policy="ratio", ratio=0.3), exclude=("/0/Conv",),
                                calibration=CalibrationConfig(samples=128, stages=3))
    real = correct_module.correct_chains
    results = {}
    for segments in (True, False):
        monkeypatch.setattr(correct_module, "correct_chains", lambda *a, _s=segments, **k: real(*a, segments=_s, **k))
        results[segments] = compress(model, config=config, calibration=calib)
    (cut, cut_report), (full, full_report) = results[True], results[False]
    moves = cut_report.calibration["correction"]["cuts"]
    assert moves["compressed_moves"] >= 1 and moves["original_moves"] >= 1 and moves["check_moves"] >= 1
    assert 0 < moves["peak_mb"] <= moves["budget_mb"] == 512.0
    assert {k: v for k, v in full_report.calibration["correction"]["cuts"].items() if k.endswith("moves")} == {
        "compressed_moves": 0, "original_moves": 0, "check_moves": 0}
    a, b = cut_report.calibration["correction"]["end_to_end"], full_report.calibration["correction"]["end_to_end"]
    assert a["reverted_layers"] == b["reverted_layers"] and a["checks"] == b["checks"]
    assert a["held_out_error_after"] == pytest.approx(b["held_out_error_after"], rel=1e-4)
    assert [l.correction["applied"] for l in cut_report.decomposed] == [l.correction["applied"] for l in full_report.decomposed]
    for feeds in held:
        assert rel_l2(run_ort(cut, feeds)[0], run_ort(full, feeds)[0]) < 1e-5
    assert a["held_out_error_after"] < a["held_out_error_before"]


def test_overlapped_statistics_pass_equals_the_sequential_one(monkeypatch):
    """ONNX Runtime computing the next run while the current run's moments are added changes no
    figure: moments, tiles and the kept correction samples equal those of the pass run in turn
    (bundled model, batch 16 of the calibration set: 8 runs, both splits of the batches)."""
    import functools

    import onnxfactor.calibration as calibration
    from onnxfactor import calibrate

    data = dict(np.load(CALIB))
    feeds = [{"input": data["input"][i : i + 16]} for i in range(0, 128, 16)]
    config = CompressConfig(calibration=CalibrationConfig(memory_mb=2, correction_samples=24))
    runs = []
    real = calibration.collect_statistics

    def counted(*a, **k):
        stats = real(*a, **k)
        runs.append(stats)
        return stats

    monkeypatch.setattr(calibration, "collect_statistics", counted)
    overlapped = calibrate(MODELS / "fashion_cnn.onnx", feeds, config=config)
    monkeypatch.setattr(calibration, "collect_statistics", functools.partial(counted, overlap=False))
    sequential = calibrate(MODELS / "fashion_cnn.onnx", feeds, config=config)
    assert len(runs) == 2 and overlapped.samples == sequential.samples == 128
    assert overlapped.memory["run_mb"] > 0 and overlapped.memory == sequential.memory
    assert list(overlapped.layers) == list(sequential.layers) and len(overlapped.layers) >= 4
    for name, a in overlapped.layers.items():
        b = sequential.layers[name]
        for ma, mb in ((a.inputs, b.inputs), (a.outputs, b.outputs)):
            assert (ma.count, ma.gram_count, ma.gram_weight) == (mb.count, mb.gram_count, mb.gram_weight)
            np.testing.assert_array_equal(ma.sum, mb.sum)
            for ga, gb in zip(ma.grams, mb.grams):
                np.testing.assert_array_equal(ga, gb)
        assert a.tiles.count == b.tiles.count > 0
    ids = lambda s: np.concatenate([c.samples for c in s.cache])  # noqa: E731
    np.testing.assert_array_equal(ids(overlapped), ids(sequential))
    assert len(ids(overlapped)) == 24
