"""Folding inference-mode BatchNormalization into the Conv before it (onnxfactor.batchnorm)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxfactor.batchnorm import fold_batch_norms
from tests.conftest import rel_l2, run_ort


def _bn_inits(prefix: str, c: int, rng, scales=None) -> list:
    scale = rng.uniform(0.5, 2.0, c) if scales is None else np.asarray(scales, np.float64)
    return [
        numpy_helper.from_array(scale.astype(np.float32), f"{prefix}_scale"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), f"{prefix}_b"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), f"{prefix}_mean"),
        numpy_helper.from_array(rng.uniform(0.1, 3.0, c).astype(np.float32), f"{prefix}_var"),
    ]


def _model(*, conv_bias=True, group=1, dims=2, second_reader=False, bn_output_is_graph_output=False, shared_weight=False,
           training_outputs=False, scales=None, c=16, seed=0) -> onnx.ModelProto:
    """x -> Conv (c -> c) -> BatchNormalization -> Relu -> y; options add the cases that must not fold."""
    rng = np.random.default_rng(seed)
    kernel = [3] * dims
    w = (rng.standard_normal((c, c // group, *kernel)) / np.sqrt(9 * c / group)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    conv_inputs = ["x", "w"]
    if conv_bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "cb"))
        conv_inputs.append("cb")
    inits += _bn_inits("bn", c, rng, scales)
    nodes = [
        helper.make_node("Conv", conv_inputs, ["conv_out"], name="/conv/Conv", kernel_shape=kernel, pads=[1] * (2 * dims), group=group),
        helper.make_node("BatchNormalization", ["conv_out", "bn_scale", "bn_b", "bn_mean", "bn_var"],
                         ["bn_out", "rm", "rv"] if training_outputs else ["bn_out"], name="/bn/BatchNormalization", epsilon=1e-3),
        helper.make_node("Relu", ["bn_out"], ["y"], name="/relu/Relu"),
    ]
    rank = [None] * (2 + dims)
    outputs = [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, rank)]
    if second_reader:
        nodes.append(helper.make_node("Identity", ["conv_out"], ["raw"], name="raw"))
        outputs.append(helper.make_tensor_value_info("raw", onnx.TensorProto.FLOAT, rank))
    if bn_output_is_graph_output:
        outputs.append(helper.make_tensor_value_info("bn_out", onnx.TensorProto.FLOAT, rank))
    if shared_weight:  # a second Conv on the same weight, without a batch norm
        nodes.append(helper.make_node("Conv", ["y", "w"], ["z"], name="/conv2/Conv", kernel_shape=kernel, pads=[1] * (2 * dims), group=group))
        outputs = [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, rank)]
    spatial = [9] * dims
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, c, *spatial])], outputs,
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _feeds(model, seed=1):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


@pytest.mark.parametrize("case", [dict(), dict(conv_bias=False), dict(group=4), dict(dims=1), dict(dims=3, c=8),
                                  dict(bn_output_is_graph_output=True), dict(shared_weight=True)])
def test_fold_is_exact_and_removes_the_batch_norm(case):
    model = _model(**case)
    feeds = _feeds(model)
    before = run_ort(model, feeds)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    assert fold_batch_norms(folded) == ["/conv/Conv"]
    onnx.checker.check_model(folded, full_check=True)
    ops = [n.op_type for n in folded.graph.node]
    assert "BatchNormalization" not in ops
    conv = next(n for n in folded.graph.node if n.name == "/conv/Conv")
    assert conv.output[0] == "bn_out"  # later names stay those of the original
    after = run_ort(folded, feeds)
    assert len(after) == len(before)
    for a, b in zip(before, after):
        assert rel_l2(a, b) < 1e-6
    names = {t.name for t in folded.graph.initializer}
    assert not names & {"bn_scale", "bn_b", "bn_mean", "bn_var", "cb"}  # unused afterwards: dropped
    assert ("w" in names) == bool(case.get("shared_weight"))  # the other Conv keeps the shared weight


@pytest.mark.parametrize("case", [dict(second_reader=True), dict(training_outputs=True)])
def test_not_folded_where_it_would_not_be_exact(case):
    model = _model(**case)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    assert fold_batch_norms(copy) == []
    assert copy.SerializeToString() == model.SerializeToString()


def test_batch_norm_statistics_given_as_graph_inputs_are_not_folded():
    model = _model()
    var = next(t for t in model.graph.initializer if t.name == "bn_var")
    model.graph.input.append(helper.make_tensor_value_info("bn_var", onnx.TensorProto.FLOAT, list(var.dims)))  # overridable at run time
    assert fold_batch_norms(model) == []


def _compress(model, tmp_path, fold: bool):
    from onnxfactor import CompressConfig, compress
    from onnxfactor.config import RankConfig

    ranks = tmp_path / "ranks.json"
    ranks.write_text(json.dumps({"/conv/Conv": {"out": 4, "in": 16}}))
    config = CompressConfig(ranks=RankConfig(policy="file", rank_file=ranks), min_reduction=None, in_mode_min_channels=0,
                            fold_batchnorm=fold)
    return compress(model, config=config)


def test_factors_fit_the_folded_map(tmp_path):
    """A batch norm that scales 4 output channels by 10 and the other 12 by 0.01: the layer's map is
    nearly rank 4 on the output mode, which the fit sees only once the batch norm is folded."""
    scales = [10.0] * 4 + [0.01] * 12
    model = _model(scales=scales, conv_bias=False)
    feeds = _feeds(model, seed=3)
    (reference,) = run_ort(model, feeds)
    folded, report = _compress(model, tmp_path, fold=True)
    kept, report_kept = _compress(model, tmp_path, fold=False)
    assert [n.op_type for n in folded.graph.node].count("BatchNormalization") == 0
    assert [n.op_type for n in kept.graph.node].count("BatchNormalization") == 1
    assert any("BatchNormalization node(s) folded" in w for w in report.warnings)
    assert not any("BatchNormalization" in w for w in report_kept.warnings)
    err_folded = rel_l2(reference, run_ort(folded, feeds)[0])
    err_kept = rel_l2(reference, run_ort(kept, feeds)[0])
    # measured: 0.0020 folded against 0.54 kept (output rank 4, input rank full)
    assert err_folded < 0.01
    assert err_kept > 0.3


def test_nothing_decomposed_writes_the_input_with_its_batch_norm(tmp_path):
    from onnxfactor import CompressConfig
    from onnxfactor.pipeline import compress_file

    src = tmp_path / "in.onnx"
    onnx.save(_model(), str(src))
    before = src.read_bytes()
    out = tmp_path / "out.onnx"
    compress_file(src, out, config=CompressConfig(min_reduction=0.99, fold_batchnorm=True))
    assert out.read_bytes() == before
    assert src.read_bytes() == before


def test_statistics_are_reused_only_with_the_same_folding():
    from onnxfactor import CompressConfig, calibrate, compress
    from onnxfactor.errors import UsageError

    model = _model()
    feeds = [_feeds(model, seed=s) for s in range(4)]
    stats = calibrate(model, feeds, config=CompressConfig(fold_batchnorm=True))
    assert stats.fold_batchnorm
    compress(model, config=CompressConfig(fold_batchnorm=True), calibration=stats)  # same setting: accepted
    with pytest.raises(UsageError, match="batch norms folded"):
        compress(model, config=CompressConfig(), calibration=stats)
    kept = calibrate(model, feeds, config=CompressConfig())
    with pytest.raises(UsageError, match="batch norms kept"):
        compress(model, config=CompressConfig(fold_batchnorm=True), calibration=kept)


@pytest.mark.parametrize("fold", [True, False])
def test_cli_folds_only_when_asked(tmp_path, fold):
    import subprocess
    import sys

    src = tmp_path / "in.onnx"
    model = _model(scales=[10.0] * 4 + [0.01] * 12, conv_bias=False)
    onnx.save(model, str(src))
    ranks = tmp_path / "ranks.json"
    ranks.write_text(json.dumps({"/conv/Conv": {"out": 4, "in": 16}}))
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    args = ["compress", src, out, "--rank-file", ranks, "--min-reduction", "-1", "--in-min-channels", "0", "--no-measure",
            "--report", report, "-q", *(["--fold-batchnorm"] if fold else [])]
    proc = subprocess.run([sys.executable, "-m", "onnxfactor", *map(str, args)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    written = onnx.load(str(out))
    assert [n.op_type for n in written.graph.node].count("BatchNormalization") == (0 if fold else 1)
    warnings = json.loads(report.read_text())["warnings"]
    assert any("--fold-batchnorm" in w for w in warnings) == fold
    worst = json.loads(report.read_text())["validation"]["worst_rel_l2"]
    assert (worst < 0.01) if fold else (worst > 0.3)  # the folded map is nearly rank 4 on the output mode


def test_only_what_a_fold_released_is_dropped():
    model = _model()
    model.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "unrelated_unused"))
    assert fold_batch_norms(model) == ["/conv/Conv"]
    assert "unrelated_unused" in {t.name for t in model.graph.initializer}
