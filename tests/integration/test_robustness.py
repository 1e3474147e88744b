"""Robustness on structures found in real files: quantized-only models, dims that must be inferred,
shape-less outputs, non-finite outputs, the timing cache, the safe-default warning, external data."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfactor import CompressConfig, LatencyConfig, RankConfig, compress, compress_file
from onnxfactor.errors import NothingToCompress, UsageError
from onnxfactor.latency import FakeTimer
from onnxfactor.validation import OutputComparison, ValidationResult, compare_outputs
from tests.conftest import MODELS, make_conv_model, rel_l2, run_ort
from tests.integration.test_cli import assert_user_error, cli, listing, sha256

ort = pytest.importorskip("onnxruntime")


def _model(nodes, inputs, outputs, inits, opset=17) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializer=inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def conv_integer_model() -> onnx.ModelProto:
    """Two ConvInteger after DynamicQuantizeLinear (what onnxruntime's quantize_dynamic writes): no float Conv."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(2):
        inits.append(numpy_helper.from_array(rng.integers(-100, 100, (4, 4, 3, 3)).astype(np.int8), f"w{i}"))
        nodes += [helper.make_node("DynamicQuantizeLinear", [x], [f"q{i}", f"s{i}", f"z{i}"], name=f"dq{i}"),
                  helper.make_node("ConvInteger", [f"q{i}", f"w{i}", f"z{i}"], [f"i{i}"], name=f"convint{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Cast", [f"i{i}"], [f"f{i}"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", [f"f{i}", f"s{i}"], [f"y{i}"])]
        x = f"y{i}"
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                  [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 4, 8, 8])], inits)


def test_quantized_only_model_is_nothing_to_compress(tmp_path):
    model = conv_integer_model()
    onnx.checker.check_model(model, full_check=True)
    with pytest.raises(NothingToCompress, match=r"2 conv-like nodes are not candidates: convint0 \(ConvInteger\): quantized") as e:
        compress(model)
    assert "\n" not in str(e.value)
    onnx.save(model, tmp_path / "q.onnx")
    proc = cli("compress", "q.onnx", "out.onnx", cwd=tmp_path)
    assert_user_error(proc, 5, "ConvInteger", "convint1")
    assert listing(tmp_path) == ["q.onnx"]


def test_when_nothing_is_decomposed_the_output_is_the_input_unchanged(tmp_path):
    """Every layer rolled back by the end-to-end guard (the fake timer calls every chain slower):
    the file written is the input model itself, byte for byte (not its normalised re-export)."""
    source = MODELS / "fashion_cnn.onnx"
    target = tmp_path / "out.onnx"
    config = CompressConfig(latency=LatencyConfig(rank_search=False))
    from onnxfactor import pipeline

    original_compress = pipeline.compress
    slow = FakeTimer(lambda m: float(len(m.graph.node)))  # more nodes, more time: every chain is slower
    try:
        pipeline.compress = lambda *a, **k: original_compress(*a, **{**k, "timer": slow})
        report = compress_file(source, target, config=config, validation=None)
    finally:
        pipeline.compress = original_compress
    assert not report.decomposed and slow.calls
    assert any("the output is the input model unchanged" in w for w in report.warnings)
    assert target.read_bytes() == source.read_bytes()


def watermark_model(fixed: int = 32, reshape: tuple | None = None) -> onnx.ModelProto:
    """``data: [batch_size, wmBits]`` added to a ``fixed``-wide constant (or reshaped to ``reshape``), then two Conv1d."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(fixed).astype(np.float32), "c"),
             numpy_helper.from_array(np.array([1], np.int64), "ax"),
             numpy_helper.from_array(rng.standard_normal((16, 1, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((16, 16, 3)).astype(np.float32), "w2")]
    first = [helper.make_node("Add", ["data", "c"], ["a"]), helper.make_node("Unsqueeze", ["a", "ax"], ["u"])]
    if reshape is not None:
        inits.append(numpy_helper.from_array(np.array(reshape, np.int64), "shape"))
        first = [helper.make_node("Reshape", ["data", "shape"], ["u"])]
    nodes = first + [helper.make_node("Conv", ["u", "w1"], ["h"], pads=[1, 1], name="conv1"), helper.make_node("Relu", ["h"], ["r"]),
                     helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1], name="conv2")]
    return _model(nodes, [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["batch_size", "wmBits"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size", 16, None])], inits)


def test_a_dynamic_dim_bound_by_broadcast_is_inferred_and_said(tmp_path):
    model = watermark_model()
    onnx.save(model, tmp_path / "wm.onnx")
    report = compress_file(tmp_path / "wm.onnx", tmp_path / "out.onnx", config=CompressConfig(min_reduction=None),
                           report_path=tmp_path / "r.json")
    assert report.input_shapes == {"data": [1, 32]}
    assert any("input 'data' dim wmBits set to 32" in w and "224" in w for w in report.warnings)
    assert report.validation["samples"] == 1 and report.validation["worst_rel_l2"] < 1.0
    x = {"data": np.random.default_rng(2).standard_normal((3, 32)).astype(np.float32)}
    assert run_ort(tmp_path / "out.onnx", x)[0].shape == (3, 16, 32)


def test_a_dynamic_dim_bound_by_reshape_is_inferred():
    model = watermark_model(reshape=(1, 1, 35))  # ONNX Runtime names the requested shape {1,1,35}
    _, report = compress(model, config=CompressConfig(min_reduction=None))
    assert report.input_shapes == {"data": [1, 35]}


def test_a_dynamic_dim_that_cannot_be_inferred_is_a_usage_error(tmp_path):
    """Reshaped to [1, 5, 7]: wmBits must be 35, a number ONNX Runtime's message does not name."""
    rng = np.random.default_rng(0)
    model = _model([helper.make_node("Reshape", ["data", "shape"], ["u"]),
                    helper.make_node("Conv", ["u", "w"], ["y"], pads=[1, 1], name="conv")],
                   [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["batch_size", "wmBits"])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 7])],
                   [numpy_helper.from_array(np.array([1, 5, 7], np.int64), "shape"),
                    numpy_helper.from_array(rng.standard_normal((16, 5, 3)).astype(np.float32), "w")])
    onnx.save(model, tmp_path / "wm.onnx")
    proc = cli("compress", "wm.onnx", "out.onnx", cwd=tmp_path)
    line = assert_user_error(proc, 2, "data=1x224", "--input-shape", "wmBits", "reshape")
    assert "onnxruntime_src" not in line
    assert listing(tmp_path) == ["wm.onnx"]
    proc = cli("compress", "wm.onnx", "out.onnx", "--input-shape", "data=1x35", "--min-reduction", "-1", "--no-measure", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = cli("compress", "wm.onnx", "out2.onnx", "--no-measure", "--no-validate", "--min-reduction", "-1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr  # no run needed: the shapes do not matter


def test_graph_outputs_without_shape_are_declared(tmp_path):
    model = make_conv_model(pads=(1, 1, 1, 1))
    model.graph.output[0].type.tensor_type.ClearField("shape")
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model, full_check=True)
    onnx.save(model, tmp_path / "m.onnx")
    report = compress_file(tmp_path / "m.onnx", tmp_path / "out.onnx", config=CompressConfig(ranks=RankConfig(policy="ratio"), min_reduction=None),
                           validation=None)
    assert report.decomposed
    assert any("graph output 'y' had no shape: declared [1, 12, 11, 13] from shape inference" in w for w in report.warnings)
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)
    assert [d.dim_value for d in onnx.load(str(tmp_path / "out.onnx")).graph.output[0].type.tensor_type.shape.dim] == [1, 12, 11, 13]


def test_nan_outputs_never_count_as_agreement():
    a = np.array([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]], np.float32)
    b = np.full_like(a, np.nan)
    (result,) = compare_outputs({"y": a}, {"y": b})
    assert result.top1_agreement == 0.0 and result.rel_l2 == float("inf")
    (both,) = compare_outputs({"y": b}, {"y": b})
    assert both.top1_agreement == 0.0


@pytest.mark.parametrize("agreement,rel,far", [
    (0.95, 0.1, None), (0.89, 0.1, "top-1 agreement 0.890 (< 0.9)"), (None, 0.31, "relative L2 error 0.31 (> 0.3)"),
    (0.99, float("nan"), "relative L2 error nan"), (0.9, 0.3, None),
])
def test_far_from_original_thresholds(agreement, rel, far):
    result = ValidationResult([OutputComparison("y", 1.0, rel, 0.9, agreement)], 10, "random (seed 0)", ["CPUExecutionProvider"])
    got = result.far_from_original()
    assert got is None if far is None else far in got


def test_safe_default_warns_with_the_measured_figures_and_the_fixes(tmp_path):
    """Plain VBMF on the small bundled model (14.7x fewer MACs) is far from the original on random
    inputs: the report says so with the figures and the options that trade compression for accuracy."""
    report = compress_file(MODELS / "fashion_cnn.onnx", tmp_path / "out.onnx", config=CompressConfig())
    warning = report.accuracy_warning
    assert warning is not None and "on random inputs" in warning
    assert "relative L2 error" in warning and "--weaken" in warning and "--calibration" in warning and "--reconstruct" in warning
    exact = compress_file(MODELS / "fashion_cnn.onnx", tmp_path / "exact.onnx",
                          config=CompressConfig(ranks=RankConfig(policy="ratio", ratio=1.0), min_reduction=None))
    assert exact.accuracy_warning is None
    proc = cli("compress", MODELS / "fashion_cnn.onnx", "cli.onnx", "--no-measure", "-q", cwd=tmp_path)
    assert proc.returncode == 0 and "WARNING: the compressed model is far from the original on random inputs" in proc.stdout
    assert "validated on random inputs: output errors only, not task accuracy" in proc.stdout


def test_timing_cache_hit_writes_a_byte_identical_model(tmp_path):
    """Two measured runs sharing --timing-cache: the second times nothing and writes the same bytes."""
    model = tmp_path / "m.onnx"
    model.write_bytes((MODELS / "fashion_cnn.onnx").read_bytes())
    outputs = []
    for i in range(2):
        proc = cli("compress", "m.onnx", f"out{i}.onnx", "--timing-cache", "cache.json", "--exclude", "/0/Conv",
                   "--no-validate", "--report", f"r{i}.json", "-q", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        outputs.append(sha256(tmp_path / f"out{i}.onnx"))
    first, second = (json.loads((tmp_path / f"r{i}.json").read_text())["speed"]["timing_cache"] for i in range(2))
    assert first["misses"] > 5 and first["hits"] == 0
    assert second == {**first, "hits": first["misses"], "misses": 0}
    assert outputs[0] == outputs[1]
    (tmp_path / "bad.json").write_text("[1, 2]")
    proc = cli("compress", "m.onnx", "o.onnx", "--timing-cache", "bad.json", cwd=tmp_path)
    assert_user_error(proc, 2, "bad.json", "--timing-cache")


def test_external_data_on_request(tmp_path):
    report = compress_file(MODELS / "fashion_cnn.onnx", tmp_path / "out.onnx", validation=None, external_data=True,
                           config=CompressConfig(ranks=RankConfig(policy="ratio"), exclude=("/0/Conv",)))
    assert report.decomposed
    assert (tmp_path / "out.onnx.data").stat().st_size > 100_000 > (tmp_path / "out.onnx").stat().st_size
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)
    x = {"input": np.load(MODELS / "fashion_mnist_test.npz")["input"][:4]}
    expected = run_ort(compress(MODELS / "fashion_cnn.onnx", config=CompressConfig(ranks=RankConfig(policy="ratio"), exclude=("/0/Conv",))).model, x)[0]
    assert rel_l2(expected, run_ort(tmp_path / "out.onnx", x)[0]) < 1e-6


def dynamic_conv_model() -> onnx.ModelProto:
    """One 3x3 Conv (16 -> 16) whose input is ``x: [N, 16, H, W]`` (a detector's dynamic page size)."""
    model = make_conv_model(16, 16, (3, 3), (11, 13), pads=[1, 1, 1, 1])
    for axis, name in ((0, "N"), (2, "H"), (3, "W")):
        model.graph.input[0].type.tensor_type.shape.dim[axis].dim_param = name
    return model


def test_dynamic_dims_come_from_the_data_and_latency_is_timed_at_one_sample(tmp_path):
    """Fed 20 x 28 calibration inputs and 30 x 18 held-out ones, the model is analysed, timed and
    validated at the held-out size with batch 1 (not 224 x 224); the report says so."""
    model = dynamic_conv_model()
    onnx.save(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((12, 16, 20, 28)).astype(np.float32))
    np.savez(tmp_path / "held.npz", x=rng.standard_normal((8, 16, 30, 18)).astype(np.float32))
    from onnxfactor import ValidationOptions

    config = CompressConfig(ranks=RankConfig(policy="ratio", ratio=0.5), min_reduction=None,
                            latency=LatencyConfig(allow_slower=True))
    report = compress_file(tmp_path / "m.onnx", tmp_path / "out.onnx", config=config, calibration=tmp_path / "calib.npz",
                           validation=ValidationOptions(data=tmp_path / "held.npz", latency_runs=3))
    assert report.input_shapes == {"x": [1, 16, 30, 18]}
    assert any("first sample of the validation data: x=1x16x30x18" in w for w in report.warnings)
    layer = report.layers[0]
    assert layer.macs_before == 16 * 16 * 9 * 30 * 18  # per sample, at the data's size
    assert report.validation["samples"] == 8 and report.validation["latency_shapes"] == {"x": [1, 16, 30, 18]}
    # calibration data alone fixes them too; --input-shape wins over both
    _, alone = compress(model, config=dataclasses.replace(config, latency=None), calibration=tmp_path / "calib.npz")
    assert alone.input_shapes == {"x": [1, 16, 20, 28]}
    _, given = compress(model, config=dataclasses.replace(config, latency=None), calibration=tmp_path / "calib.npz",
                        input_shapes={"x": (2, 16, 9, 9)})
    assert given.input_shapes == {"x": [2, 16, 9, 9]} and not any("first sample" in w for w in given.warnings)
    # a one-shot generator is not peeked at (its first batch would be lost): the defaults stay
    feeds = ({"x": rng.standard_normal((4, 16, 20, 28)).astype(np.float32)} for _ in range(3))
    _, once = compress(model, config=dataclasses.replace(config, latency=None), calibration=feeds)
    assert once.input_shapes == {"x": [1, 16, 224, 224]}
    assert once.calibration["samples"] == 12  # every batch of the generator reached the statistics
