"""Fully connected layers as candidates (``include_linear``): Gemm / MatMul rewritten as two-node SVD chains.

Exactness at full rank against ONNX Runtime over the Gemm attribute matrix and MatMul batch dims,
truncation equal to numpy's truncated SVD, the data-aware fit, selection, measured selection,
totals, real models with fully connected heads, the bundled model and the CLI.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfactor import CompressConfig, RankConfig, analyze, compress, io
from onnxfactor.config import CalibrationConfig, LatencyConfig
from onnxfactor.errors import NothingToCompress, UsageError
from onnxfactor.latency import FakeTimer, node_cost
from onnxfactor.pipeline import check_written_model
from tests.conftest import MODELS, rel_l2, run_ort
from tests.integration.test_cli import cli
from tools import model_zoo

ort = pytest.importorskip("onnxruntime")


def _model(nodes, inputs, outputs, inits, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def gemm_model(k=12, n=9, m=5, *, trans_a=0, trans_b=0, alpha=1.0, beta=1.0, bias="out", seed=0, opset=17, weight=None):
    """One Gemm ``fc``: input ``A`` (``m x k``, transposed with ``trans_a``), output ``Y`` (``m x n``)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) if weight is None else weight.astype(np.float32)
    inits = {"B": np.ascontiguousarray(w.T if trans_b else w)}
    names = ["A", "B"]
    if bias is not None:
        inits["C"] = rng.standard_normal({"out": (n,), "1xout": (1, n), "mxout": (m, n), "scalar": ()}[bias]).astype(np.float32)
        names.append("C")
    node = helper.make_node("Gemm", names, ["Y"], name="fc", alpha=alpha, beta=beta, transA=trans_a, transB=trans_b)
    a_shape = [k, m] if trans_a else [m, k]
    return _model([node], [helper.make_tensor_value_info("A", TensorProto.FLOAT, a_shape)],
                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])], inits, opset), a_shape


def matmul_model(x_shape, n=7, seed=0):
    rng = np.random.default_rng(seed)
    k = x_shape[-1]
    node = helper.make_node("MatMul", ["X", "W"], ["Y"], name="proj")
    y_shape = [*x_shape[:-1], n]
    return _model([node], [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))],
                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, y_shape)], {"W": rng.standard_normal((k, n)).astype(np.float32)})


def _rank_file(tmp_path, ranks: dict):
    path = tmp_path / "ranks.json"
    path.write_text(json.dumps(ranks))
    return path


def _file_config(tmp_path, ranks: dict, **kwargs) -> CompressConfig:
    return CompressConfig(ranks=RankConfig(policy="file", rank_file=_rank_file(tmp_path, ranks)), min_reduction=None,
                          include_linear=True, **kwargs)


def _feed(model, rng):
    value = model.graph.input[0]
    shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
    return {value.name: rng.standard_normal(shape).astype(np.float32)}


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("bias", [None, "out", "1xout"])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.7, -1.3)])
def test_gemm_at_full_rank_is_exact(tmp_path, trans_a, trans_b, bias, alpha, beta):
    model, _ = gemm_model(trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta, bias=bias)
    compressed, report = compress(model, config=_file_config(tmp_path, {"fc": 9}))
    (layer,) = report.layers
    assert layer.status == "decomposed" and layer.op_type == "Gemm" and layer.method == "svd" and layer.ranks == {"rank": 9}
    assert layer.new_nodes == ["fc/svd_first", "fc/svd_last"]
    nodes = {n.name: n for n in compressed.graph.node}
    assert [n.op_type for n in compressed.graph.node] == ["Gemm", "Gemm"]
    assert nodes["fc/svd_last"].output == ["Y"]  # consumers and graph outputs untouched
    assert all(helper.get_attribute_value(a) == 0 for n in nodes.values() for a in n.attribute if a.name == "transB")
    onnx.checker.check_model(compressed, full_check=True)
    feed = _feed(model, np.random.default_rng(1))
    assert rel_l2(run_ort(model, feed)[0], run_ort(compressed, feed)[0]) <= 1e-5


@pytest.mark.parametrize("bias", ["mxout", "scalar"])
def test_gemm_with_a_broadcast_bias_at_opset_9_is_exact(tmp_path, bias):
    """Before opset 11 C is required: the first Gemm gets a zero one."""
    model, _ = gemm_model(trans_b=1, alpha=0.5, beta=2.0, bias=bias, opset=9)
    compressed, report = compress(model, config=_file_config(tmp_path, {"fc": 9}))
    assert report.layers[0].status == "decomposed"
    first = next(n for n in compressed.graph.node if n.name == "fc/svd_first")
    assert len(first.input) == 3
    onnx.checker.check_model(compressed, full_check=True)
    feed = _feed(model, np.random.default_rng(1))
    assert rel_l2(run_ort(model, feed)[0], run_ort(compressed, feed)[0]) <= 1e-5


@pytest.mark.parametrize("x_shape", [(6,), (5, 10), (2, 5, 10), (2, 3, 4, 10)])
def test_matmul_with_batch_dims_at_full_rank_is_exact(tmp_path, x_shape):
    model = matmul_model(x_shape)
    compressed, report = compress(model, config=_file_config(tmp_path, {"proj": min(x_shape[-1], 7)}))
    (layer,) = report.layers
    assert layer.status == "decomposed" and layer.op_type == "MatMul"
    assert [n.op_type for n in compressed.graph.node] == ["MatMul", "MatMul"]
    rows = int(np.prod(x_shape[1:-1])) if len(x_shape) >= 3 else 1  # per sample: axis 0 is the sample axis
    r = min(x_shape[-1], 7)
    assert layer.macs_before == rows * x_shape[-1] * 7 and layer.macs_after == rows * r * (x_shape[-1] + 7)
    onnx.checker.check_model(compressed, full_check=True)
    feed = _feed(model, np.random.default_rng(1))
    assert rel_l2(run_ort(model, feed)[0], run_ort(compressed, feed)[0]) <= 1e-5


def test_float16_gemm_at_full_rank(tmp_path):
    model, _ = gemm_model(trans_b=1, bias="out")
    half = onnx.ModelProto()
    half.CopyFrom(model)
    for t in half.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in (*half.graph.input, *half.graph.output):
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    compressed, report = compress(half, config=_file_config(tmp_path, {"fc": 9}))
    assert report.layers[0].status == "decomposed"
    assert {t.data_type for t in compressed.graph.initializer} == {TensorProto.FLOAT16}
    feed = {"A": np.random.default_rng(1).standard_normal((5, 12)).astype(np.float16)}
    assert rel_l2(run_ort(half, feed)[0], run_ort(compressed, feed)[0]) <= 5e-3


# --------------------------------------------------------------------------- truncation and rank policies


def _low_rank(k, n, rank, noise, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((k, rank)) @ rng.standard_normal((rank, n)) + noise * rng.standard_normal((k, n))


@pytest.mark.parametrize("k,n", [(24, 40), (40, 24)])  # both sides of the Gram matrix
def test_truncated_rank_matches_numpys_truncated_svd(tmp_path, k, n):
    w = _low_rank(k, n, 6, 0.3)
    model, _ = gemm_model(k, n, m=8, trans_b=1, alpha=0.8, bias="out", weight=w)
    compressed, report = compress(model, config=_file_config(tmp_path, {"fc": 5}))
    (layer,) = report.layers
    u, s, vt = np.linalg.svd(w.astype(np.float32).astype(np.float64), full_matrices=False)
    w5 = (u[:, :5] * s[:5]) @ vt[:5]
    assert layer.rel_reconstruction_error == pytest.approx(np.linalg.norm(w - w5) / np.linalg.norm(w), rel=1e-6)
    assert layer.params_after == 5 * (k + n)
    feed = _feed(model, np.random.default_rng(2))
    bias = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "C"))
    expected = 0.8 * feed["A"].astype(np.float64) @ w5 + bias
    assert rel_l2(expected, run_ort(compressed, feed)[0]) <= 1e-5


def test_error_policy_takes_the_cheapest_rank_meeting_the_target():
    w = _low_rank(30, 50, 8, 0.2)
    model, _ = gemm_model(30, 50, trans_b=1, weight=w)
    s = np.linalg.svd(w.astype(np.float32).astype(np.float64), compute_uv=False)
    errors = np.sqrt(np.cumsum((s ** 2)[::-1])[::-1] / np.sum(s ** 2))  # errors[r] for ranks 0..29
    for target in (0.3, 0.1):
        report = analyze(model, config=CompressConfig(ranks=RankConfig(policy="error", target_error=target), include_linear=True))
        rank = report.layers[0].ranks["rank"]
        assert errors[rank] <= target < errors[rank - 1]
        assert report.layers[0].rel_reconstruction_error <= target


@pytest.mark.parametrize("policy,expected", [("vbmf", 8), ("ratio", 15), ("energy", None), ("weakened", 19)])
def test_rank_policies_on_a_low_rank_plus_noise_weight(policy, expected):
    w = _low_rank(30, 50, 8, 0.05)
    model, _ = gemm_model(30, 50, weight=w)
    ranks = RankConfig(policy=policy, ratio=0.5, weaken=0.5, energy=0.99, round_to=1)
    (layer,) = analyze(model, config=CompressConfig(ranks=ranks, include_linear=True)).layers
    assert layer.modes[0]["vbmf_rank"] == 8 and layer.modes[0]["full_rank"] == 30
    if expected is not None:
        assert layer.ranks == {"rank": expected}
    else:
        assert 8 <= layer.ranks["rank"] <= 10
    rounded = analyze(model, config=CompressConfig(ranks=RankConfig(policy=policy, ratio=0.5, weaken=0.5, energy=0.99, round_to=4),
                                                   include_linear=True)).layers[0]
    assert rounded.ranks["rank"] % 4 == 0 and rounded.ranks["rank"] >= layer.ranks["rank"]


def test_rank_file_entries_and_unknown_names(tmp_path):
    model, _ = gemm_model(30, 50, weight=_low_rank(30, 50, 8, 0.05))
    for entry in (12, {"rank": 12}):
        report = analyze(model, config=_file_config(tmp_path, {"fc": entry}))
        assert report.layers[0].ranks == {"rank": 12}
    assert analyze(model, config=_file_config(tmp_path, {"fc": None})).layers[0].status == "kept"
    with pytest.raises(UsageError, match="unknown"):
        analyze(model, config=_file_config(tmp_path, {"fc9": 3}))


# --------------------------------------------------------------------------- data-aware fit


def _correlated_inputs(k, count, seed):
    """Inputs on a few strong directions that the weight's own top directions do not follow."""
    mix = np.random.default_rng(99).standard_normal((k, k)) * np.exp(-np.arange(k) / 3.0)[:, None]  # one distribution
    return (np.random.default_rng(seed).standard_normal((count, k)) @ mix).astype(np.float32)


def test_data_aware_fit_lowers_the_output_error_on_correlated_inputs():
    k, n, batch = 32, 48, 16
    model, _ = gemm_model(k, n, m=batch, trans_b=1, bias="out", weight=np.random.default_rng(3).standard_normal((k, n)))
    calibration = [{"A": x} for x in _correlated_inputs(k, 40 * batch, seed=4).reshape(40, batch, k)]
    held_out = {"A": _correlated_inputs(k, batch, seed=5)}
    expected = run_ort(model, held_out)[0]
    errors, reported = {}, {}
    for fit in ("data", "weights"):
        config = CompressConfig(ranks=RankConfig(policy="ratio", ratio=0.25), include_linear=True,
                                calibration=CalibrationConfig(fit=fit))
        compressed, report = compress(model, config=config, calibration=calibration)
        (layer,) = report.layers
        assert layer.status == "decomposed" and layer.fit == fit and layer.ranks == {"rank": 8}
        errors[fit] = rel_l2(expected, run_ort(compressed, held_out)[0])
        reported[fit] = layer.output_error
        # the reported output error is exact on the calibration data (from its moments)
        got = np.concatenate([run_ort(compressed, f)[0] for f in calibration])
        ref = np.concatenate([run_ort(model, f)[0] for f in calibration])
        assert layer.output_error == pytest.approx(rel_l2(ref, got), rel=1e-3)
    assert errors["data"] < 0.2 * errors["weights"], errors  # measured here: 0.074 vs 0.663
    assert reported["data"] < 0.2 * reported["weights"], reported


def test_data_aware_fit_on_the_wide_side_and_at_full_rank(tmp_path):
    """K > N: the fit uses the N x N moment of x W; at full rank it is exact whatever the data."""
    k, n = 40, 12
    model, _ = gemm_model(k, n, m=8, bias="out", weight=np.random.default_rng(3).standard_normal((k, n)))
    calibration = [{"A": x} for x in _correlated_inputs(k, 80, seed=4).reshape(10, 8, k)]
    held_out = {"A": _correlated_inputs(k, 8, seed=5)}
    expected = run_ort(model, held_out)[0]
    full, report = compress(model, config=_file_config(tmp_path, {"fc": n}), calibration=calibration)
    assert report.layers[0].fit == "data" and report.layers[0].output_error < 1e-6
    assert rel_l2(expected, run_ort(full, held_out)[0]) <= 1e-5
    errors = {}
    for fit in ("data", "weights"):
        config = CompressConfig(ranks=RankConfig(policy="ratio", ratio=0.34), include_linear=True, calibration=CalibrationConfig(fit=fit))
        compressed, report = compress(model, config=config, calibration=calibration)
        errors[fit] = rel_l2(expected, run_ort(compressed, held_out)[0])
    assert errors["data"] < 0.4 * errors["weights"], errors  # measured here: 0.128 vs 0.472


def test_error_policy_with_calibration_targets_the_output_error():
    k, n, batch = 32, 48, 16
    model, _ = gemm_model(k, n, m=batch, trans_b=1, bias="out", weight=np.random.default_rng(3).standard_normal((k, n)))
    calibration = [{"A": x} for x in _correlated_inputs(k, 20 * batch, seed=4).reshape(20, batch, k)]
    config = CompressConfig(ranks=RankConfig(policy="error", target_error=0.05), include_linear=True)
    compressed, report = compress(model, config=config, calibration=calibration)
    (layer,) = report.layers
    got = np.concatenate([run_ort(compressed, f)[0] for f in calibration])
    ref = np.concatenate([run_ort(model, f)[0] for f in calibration])
    assert layer.status == "decomposed" and rel_l2(ref, got) <= 0.05
    # the cheapest: the next smaller rank misses the target
    one_less = CompressConfig(ranks=RankConfig(policy="ratio", ratio=(layer.ranks["rank"] - 1) / 32), include_linear=True)
    assert compress(model, config=one_less, calibration=calibration).report.layers[0].output_error > 0.05


# --------------------------------------------------------------------------- selection, totals, measured speed


def _mlp(seed=0):
    """x(1x64) -> fc1 (64x64, low rank) -> Relu -> fc2 (64x32, low rank, MatMul) -> fc3 (32x10)."""
    rng = np.random.default_rng(seed)
    inits = {"w1": _low_rank(64, 64, 6, 0.01, 1).astype(np.float32).T.copy(), "b1": rng.standard_normal(64).astype(np.float32),
             "w2": _low_rank(64, 32, 4, 0.01, 2).astype(np.float32), "w3": rng.standard_normal((32, 10)).astype(np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1", transB=1), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"), helper.make_node("Gemm", ["h2", "w3"], ["y"], name="fc3")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)


def test_off_by_default_and_a_model_without_conv_needs_it():
    with pytest.raises(NothingToCompress, match="no Conv node"):
        compress(_mlp())
    _, report = compress(_mlp(), config=CompressConfig(include_linear=True))
    assert [l.name for l in report.layers] == ["fc1", "fc2", "fc3"]


def test_selection_nodes_exclude_and_min_reduction():
    model = _mlp()
    report = compress(model, config=CompressConfig(include_linear=True, nodes=("fc2",))).report
    assert {l.name: l.reason for l in report.kept} == {"fc1": "not selected (--nodes)", "fc3": "not selected (--nodes)"}
    assert [l.name for l in report.decomposed] == ["fc2"]
    report = compress(model, config=CompressConfig(include_linear=True, exclude=("fc1",))).report
    assert next(l for l in report.layers if l.name == "fc1").reason == "excluded (--exclude)"
    # at half rank: fc1 (64 x 64) 0 % fewer parameters and MACs, fc2 (64 x 32) 25 %, fc3 (32 x 10) 34 %
    ranks = RankConfig(policy="ratio", ratio=0.5)
    rows = {l.name: l for l in compress(model, config=CompressConfig(include_linear=True, ranks=ranks, min_reduction=0.3)).report.layers}
    assert [rows[n].status for n in ("fc1", "fc2", "fc3")] == ["kept", "kept", "decomposed"]
    assert "params +25%, MACs +25%" in rows["fc2"].reason and "--min-reduction" in rows["fc2"].reason
    assert rows["fc3"].params_after == 5 * 42 and rows["fc3"].macs_after == 5 * 42


def test_totals_keep_the_conv_figures_and_count_the_fully_connected_savings():
    plain = compress(MODELS / "fashion_cnn.onnx").report.totals
    model, report = compress(MODELS / "fashion_cnn.onnx", config=CompressConfig(include_linear=True))
    t = report.totals
    assert (t.conv_params_before, t.conv_params_after, t.conv_macs_before, t.conv_macs_after) == (
        plain.conv_params_before, plain.conv_params_after, plain.conv_macs_before, plain.conv_macs_after)
    assert t.linear_params_before == 256 * 1152 + 10 * 256 and t.linear_params_after < t.linear_params_before
    assert t.linear_macs_ratio > 5 and t.model_params_ratio > plain.model_params_ratio
    assert t.model_params_before - t.model_params_after == (
        t.conv_params_before - t.conv_params_after + t.linear_params_before - t.linear_params_after)
    summary = report.to_dict()["summary"]
    assert summary["conv_candidates"] == 6 and summary["linear_candidates"] == 2


def test_measured_selection_keeps_a_chain_only_if_it_is_faster():
    model = _mlp()
    latency = LatencyConfig(rank_search=False, guard=False)
    config = CompressConfig(include_linear=True, latency=latency)
    # chains of fc1 cost 0.1 ms per node, of fc2 1 ms; every original node 1 ms
    cost = node_cost({"fc1/svd_first": 0.1, "fc1/svd_last": 0.1, "fc2/svd_first": 1.0, "fc2/svd_last": 1.0}, default=1.0)
    timer = FakeTimer(cost)
    compressed, report = compress(model, config=config, timer=timer)
    rows = {l.name: l for l in report.layers}
    assert rows["fc1"].status == "decomposed" and rows["fc1"].latency["speedup"] == pytest.approx(5.0)
    assert rows["fc2"].status == "kept" and rows["fc2"].reason.startswith("measured not faster")
    assert len(timer.calls) == sum(l.reason is None or l.reason.startswith("measured") for l in report.layers)
    assert {n.name for n in compressed.graph.node} >= {"fc1/svd_first", "fc1/svd_last", "fc2"}
    guarded = compress(model, config=CompressConfig(include_linear=True, latency=LatencyConfig(rank_search=False)),
                       timer=FakeTimer(cost)).report
    assert guarded.speed["rounds"][-1]["speedup"] > 1 and [l.name for l in guarded.decomposed] == ["fc1"]


def test_shared_weight_shares_the_factors():
    rng = np.random.default_rng(0)
    w = _low_rank(16, 24, 3, 0.01).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="p1"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["x", "w"], ["b"], name="p2"), helper.make_node("Add", ["r", "b"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 24])], {"w": w})
    compressed, report = compress(model, config=CompressConfig(include_linear=True))
    assert [l.status for l in report.layers] == ["decomposed", "decomposed"]
    assert len(compressed.graph.initializer) == 2  # one pair of factors for both
    feed = {"x": rng.standard_normal((2, 16)).astype(np.float32)}
    assert rel_l2(run_ort(model, feed)[0], run_ort(compressed, feed)[0]) < 0.05


def test_finetune_trains_the_fully_connected_chains_too():
    from onnxfactor.finetune.stage import chain_tensors

    model, report = compress(MODELS / "fashion_cnn.onnx", config=CompressConfig(include_linear=True))
    trainable, features = chain_tensors(model)
    linear = [l for l in report.decomposed if l.is_linear]
    assert linear
    for layer in linear:
        assert {f"{layer.name}/svd_first_weight", f"{layer.name}/svd_last_weight"} <= trainable
    outputs = {n.name: n.output[0] for n in model.graph.node}
    assert {outputs[l.new_nodes[-1]] for l in linear} <= set(features)


# --------------------------------------------------------------------------- real models


def test_bundled_model_at_full_rank_is_exact(tmp_path):
    feed = {"input": np.load(MODELS / "fashion_mnist_test.npz")["input"][:64]}
    source = onnx.load(str(MODELS / "fashion_cnn.onnx"))
    compressed, report = compress(source, config=_file_config(tmp_path, {"/16/Gemm": 256, "/18/Gemm": 10}))
    assert [l.name for l in report.decomposed] == ["/16/Gemm", "/18/Gemm"]
    assert all(l.reason == "not listed in the rank file" for l in report.kept)
    assert rel_l2(run_ort(source, feed)[0], run_ort(compressed, feed)[0]) <= 1e-5


def _light_with_structured_fc(name: str, seed: int = 1) -> tuple[onnx.ModelProto, dict]:
    """A light model with random conv weights (tools/model_zoo.py) and low-rank-plus-noise fully connected ones."""
    loaded = io.load_model(model_zoo.light_model(name))
    model = model_zoo.with_random_weights(loaded.model, seed=seed)
    gemms = {n.input[1]: n.name for n in model.graph.node if n.op_type == "Gemm"}
    rng = np.random.default_rng(seed)
    for i, init in enumerate(model.graph.initializer):
        if init.name in gemms and init.dims[0] <= 1000:  # fc8: the 4096-wide ones take ~20 s each here (excluded below)
            values = model_zoo._structured_weight(tuple(init.dims), rng)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(values, init.name))
    return io.restore_conventions(model, loaded.ir_version), gemms


@pytest.mark.parametrize("name", ["bvlc_alexnet", "vgg19"])
def test_light_models_with_fully_connected_heads(name, tmp_path):
    model, gemms = _light_with_structured_fc(name)
    fc6, fc7, fc8 = sorted(gemms.values(), key=lambda n: int(n.lstrip("n")))
    config = CompressConfig(include_linear=True, exclude=(fc6, fc7))  # their 4096 x 4096 spectra: ~20 s each on 2 cores
    compressed, report = compress(model, config=config)
    rows = {l.name: l for l in report.layers if l.is_linear}
    assert set(rows) == {fc6, fc7, fc8} and rows[fc8].status == "decomposed"
    assert rows[fc8].ranks["rank"] == rows[fc8].modes[0]["vbmf_rank"] == 250  # the structured part's rank
    t = report.totals
    assert t.linear_params_after < t.linear_params_before and t.linear_params_before == sum(r.params_before for r in rows.values())
    assert t.model_params_after < t.model_params_before - (t.conv_params_before - t.conv_params_after)
    assert compressed.ir_version == model.ir_version == 3
    out = tmp_path / "out.onnx"
    onnx.save(compressed, str(out))
    check_written_model(out, None)  # full onnx.checker and an ONNX Runtime load
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    (got,) = run_ort(out, {model.graph.input[0].name: x})[:1]
    assert got.shape == (1, 1000) and np.isfinite(got).all()


# --------------------------------------------------------------------------- CLI


def test_cli_include_linear(tmp_path):
    out, report_path = tmp_path / "small.onnx", tmp_path / "r.json"
    proc = cli("compress", MODELS / "fashion_cnn.onnx", out, "--include-linear", "--no-measure", "--exclude", "/18/Gemm",
               "--report", report_path, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "fully connected params" in proc.stdout and "Conv and fully connected layers" in proc.stdout
    report = json.loads(report_path.read_text())
    rows = {l["name"]: l for l in report["layers"] if l["op_type"] != "Conv"}
    assert rows["/16/Gemm"]["status"] == "decomposed" and rows["/18/Gemm"]["reason"] == "excluded (--exclude)"
    assert report["summary"]["linear_candidates"] == 2 and report["totals"]["linear_macs_ratio"] > 5
    assert {"/16/Gemm/svd_first", "/16/Gemm/svd_last"} <= {n.name for n in onnx.load(str(out)).graph.node}
    proc = cli("analyze", MODELS / "fashion_cnn.onnx", "--include-linear", cwd=tmp_path)
    assert proc.returncode == 0 and "/16/Gemm" in proc.stdout, proc.stderr
    helps = [cli(command, "--help", cwd=tmp_path).stdout for command in ("compress", "analyze")]
    assert all("--include-linear" in h for h in helps)
