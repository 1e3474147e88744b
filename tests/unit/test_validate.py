"""onnxfactor.validation: providers, input shapes and feeds, output comparison, accuracy, latency."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxfactor.validation.providers as providers_mod
from onnxfactor.errors import InputModelError, UsageError, ValidationFailed
from onnxfactor.validation import (
    DEFAULT_DYNAMIC_DIM_BATCH,
    DEFAULT_DYNAMIC_DIM_OTHER,
    InputSet,
    LatencyStats,
    OutputComparison,
    ValidationResult,
    compare_outputs,
    make_inputs,
    make_session,
    measure_latency,
    ort_conflict_warning,
    parse_input_shapes,
    resolve_input_shapes,
    resolve_providers,
    run_batches,
    validate,
)
from tests.conftest import rel_l2, run_ort

ort = pytest.importorskip("onnxruntime")

CPU = ["CPUExecutionProvider"]
CLASSES = 5


# ------------------------------------------------------------------------------------------------
# Tiny models


def classifier(batch=1, *, bias_delta=None, seed=0) -> onnx.ModelProto:
    """Conv(3->4, 3x3, pad 1) + Relu + Flatten + Gemm(64->5): x [batch, 3, 4, 4] -> y [batch, 5].

    ``bias_delta`` is added to the Gemm bias, which shifts every row of ``y`` by exactly that vector.
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    fc = rng.standard_normal((CLASSES, 64)).astype(np.float32)
    fc_b = rng.standard_normal(CLASSES).astype(np.float32)
    if bias_delta is not None:
        fc_b = fc_b + np.asarray(bias_delta, np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc", "fc_b"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, CLASSES])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(fc, "fc"), numpy_helper.from_array(fc_b, "fc_b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def dynamic_conv() -> onnx.ModelProto:
    """A Conv with dynamic batch, height and width (one of them without even a dim_param)."""
    w = np.ones((2, 3, 1, 1), np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "height", None])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[1, 1])],
        "dynamic",
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def mixed_types() -> onnx.ModelProto:
    """Inputs of four types: ids int64 [N, 6], mask bool [N, 6], pixels uint8 [N, 6], sr int64 scalar.

    y = where(mask, ids + pixels, 0) * sr, in float32.
    """
    nodes = [
        helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["pixels"], ["pix_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["sr"], ["sr_f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["ids_f", "pix_f"], ["s"]),
        helper.make_node("Where", ["mask", "s", "zero"], ["m"]),
        helper.make_node("Mul", ["m", "sr_f"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mixed",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 6]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N", 6]),
            helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", 6]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        initializer=[numpy_helper.from_array(np.zeros((), np.float32), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def npz(tmp_path):
    """Write arrays to an .npz file and return its path."""

    def write(name="data.npz", **arrays):
        path = tmp_path / name
        np.savez(path, **arrays)
        return path

    return write


def samples(n, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 3, 4, 4)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Providers and sessions


@pytest.mark.parametrize("name", ["cpu", "CPU", "CPUExecutionProvider", "cpuexecutionprovider", " cpu "])
def test_resolve_providers_matches_cpu(name):
    assert resolve_providers(name) == CPU


def test_resolve_providers_default_follows_availability(monkeypatch):
    expected = ["CUDAExecutionProvider", *CPU] if "CUDAExecutionProvider" in ort.get_available_providers() else CPU
    assert resolve_providers() == expected
    monkeypatch.setattr(providers_mod, "available_providers", lambda: ["CUDAExecutionProvider", *CPU])
    assert resolve_providers() == ["CUDAExecutionProvider", *CPU]
    assert resolve_providers("cuda") == ["CUDAExecutionProvider", *CPU]
    monkeypatch.setattr(providers_mod, "available_providers", lambda: ["AzureExecutionProvider", *CPU])
    assert resolve_providers() == CPU


@pytest.mark.parametrize("name", ["nope", "", "cu"])
def test_resolve_providers_unknown_lists_available(name, monkeypatch):
    monkeypatch.setattr(providers_mod, "ort_conflict_warning", lambda: None)
    with pytest.raises(UsageError) as info:
        resolve_providers(name)
    message = str(info.value)
    assert f"execution provider {name!r} is not available" in message
    assert "available: " + ", ".join(ort.get_available_providers()) in message
    assert "onnxfactor[gpu]" in message


def test_resolve_providers_unavailable_cuda_mentions_conflict(monkeypatch):
    monkeypatch.setattr(providers_mod, "available_providers", lambda: list(CPU))
    monkeypatch.setattr(providers_mod, "ort_conflict_warning", lambda: "both onnxruntime and onnxruntime-gpu are installed")
    with pytest.raises(UsageError, match=r"'cuda' is not available; available: CPUExecutionProvider \(install onnxfactor\[gpu\] for CUDA; both"):
        resolve_providers("cuda")


def test_missing_onnxruntime_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(UsageError, match=r"pip install 'onnxfactor\[cpu\]'.*onnxfactor\[gpu\]"):
        resolve_providers("cpu")


@pytest.mark.parametrize(
    ("installed", "warns"),
    [({"onnxruntime": "1.31.1"}, False), ({"onnxruntime-gpu": "1.31.1"}, False), ({"onnxruntime": "1.31.1", "onnxruntime-gpu": "1.20.0"}, True)],
)
def test_ort_conflict_warning(installed, warns, monkeypatch):
    def version(dist):
        if dist not in installed:
            raise providers_mod.importlib.metadata.PackageNotFoundError(dist)
        return installed[dist]

    monkeypatch.setattr(providers_mod.importlib.metadata, "version", version)
    warning = ort_conflict_warning()
    if warns:
        assert "onnxruntime 1.31.1" in warning and "onnxruntime-gpu 1.20.0" in warning and "pip uninstall" in warning
    else:
        assert warning is None


@pytest.mark.parametrize("from_path", [False, True])
def test_make_session_options(from_path, tmp_path):
    model = classifier()
    if from_path:
        onnx.save(model, tmp_path / "m.onnx")
        model = tmp_path / "m.onnx"
    session = make_session(model, CPU, threads=1, measuring=True)
    options = session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert session.get_providers() == CPU


def test_sessions_that_take_turns_do_not_spin_and_the_statistics_probe_does():
    """The correction's probes and the distillation's teacher take turns with another session or
    with torch: their idle workers must not spin; a probe run back to back keeps the default."""
    from onnxfactor.calibration.probe import Probe

    def spin(session):
        options = session.get_session_options()
        return [options.get_session_config_entry(f"session.{k}.allow_spinning") for k in ("intra_op", "inter_op")]

    quiet = make_session(classifier(), CPU, spinning=False)
    assert spin(quiet) == ["0", "0"]
    assert quiet.get_session_options().execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    with pytest.raises(RuntimeError):  # no entry: ONNX Runtime's default (spinning)
        spin(make_session(classifier(), CPU))
    with pytest.raises(RuntimeError):  # the statistics pass's probe runs back to back: it spins
        spin(Probe(classifier(), [], CPU).session)
    turns = Probe(classifier(), [], CPU, spinning=False)
    assert spin(turns.session) == ["0", "0"]


@pytest.mark.parametrize("threads", [0, -1, 1.5])
def test_make_session_rejects_bad_threads(threads):
    with pytest.raises(UsageError, match="--threads"):
        make_session(classifier(), CPU, threads=threads)


# ------------------------------------------------------------------------------------------------
# Input shapes


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        (["x=1x3x224x224"], {"x": (1, 3, 224, 224)}),
        (["x=1,3,8,8"], {"x": (1, 3, 8, 8)}),
        (["x = 2X3"], {"x": (2, 3)}),
        (["input:0=1x3", "encoder/ids=4"], {"input:0": (1, 3), "encoder/ids": (4,)}),
        (["a=b=7x7"], {"a=b": (7, 7)}),
        (["x=1x2", "x=1x2"], {"x": (1, 2)}),
        ([], {}),
    ],
)
def test_parse_input_shapes(specs, expected):
    assert parse_input_shapes(specs) == expected


@pytest.mark.parametrize("spec", ["x", "=1x3", "x=", "x=1x0x3", "x=1x-3", "x=1xx3", "x=1.5", "x=a"])
def test_parse_input_shapes_rejects(spec):
    with pytest.raises(UsageError) as info:
        parse_input_shapes([spec])
    assert repr(spec) in str(info.value) and "NAME=DIMS" in str(info.value)


def test_parse_input_shapes_rejects_conflicting_repeats():
    with pytest.raises(UsageError, match="twice"):
        parse_input_shapes(["x=1x2", "x=1x3"])


def test_resolve_input_shapes_defaults():
    shapes = resolve_input_shapes(dynamic_conv())
    assert shapes == {"x": (DEFAULT_DYNAMIC_DIM_BATCH, 3, DEFAULT_DYNAMIC_DIM_OTHER, DEFAULT_DYNAMIC_DIM_OTHER)}
    assert shapes["x"] == (1, 3, 224, 224)
    assert resolve_input_shapes(classifier(batch=2)) == {"x": (2, 3, 4, 4)}
    assert resolve_input_shapes(mixed_types()) == {"ids": (1, 6), "mask": (1, 6), "pixels": (1, 6), "sr": ()}


def test_resolve_input_shapes_skips_initialized_inputs():
    model = classifier()
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3]))
    assert list(resolve_input_shapes(model)) == ["x"]


def test_resolve_input_shapes_overrides():
    assert resolve_input_shapes(dynamic_conv(), {"x": (4, 3, 16, 32)}) == {"x": (4, 3, 16, 32)}


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"x": (1, 3, 16)}, r"rank 3 but input 'x' is declared \[batch, 3, height, \?\] \(rank 4\)"),
        ({"x": (1, 4, 16, 16)}, r"axis 1 is fixed at 3, got 4"),
        ({"y": (1, 3, 8, 8)}, r"'y', which is not a model input; inputs: x"),
    ],
)
def test_resolve_input_shapes_bad_overrides(override, match):
    with pytest.raises(UsageError, match=match):
        resolve_input_shapes(dynamic_conv(), override)


def test_resolve_input_shapes_unknown_rank_needs_override():
    model = dynamic_conv()
    model.graph.input[0].type.tensor_type.ClearField("shape")
    with pytest.raises(UsageError, match="--input-shape x=DIMS"):
        resolve_input_shapes(model)
    assert resolve_input_shapes(model, {"x": (1, 3, 2, 2)}) == {"x": (1, 3, 2, 2)}


# ------------------------------------------------------------------------------------------------
# Feeds


def test_random_inputs_dtypes_and_ranges():
    inputs = make_inputs(mixed_types(), seed=3, shapes={"ids": (64, 6), "mask": (64, 6), "pixels": (64, 6)})
    assert inputs.source == "random (seed 3)" and inputs.labels is None and len(inputs.batches) == 1
    feeds = inputs.batches[0]
    assert feeds["ids"].dtype == np.int64 and feeds["ids"].shape == (64, 6)
    assert feeds["ids"].min() >= 0 and feeds["ids"].max() < 10
    assert feeds["mask"].dtype == np.bool_ and 0 < feeds["mask"].mean() < 1
    assert feeds["pixels"].dtype == np.uint8 and feeds["pixels"].max() > 10
    assert feeds["sr"].dtype == np.int64 and feeds["sr"].shape == ()
    assert inputs.samples == 64
    run_ort(mixed_types(), feeds)  # the feeds are accepted as they are


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_random_inputs_float_types_and_seed(dtype):
    model = classifier()
    model.graph.input[0].type.tensor_type.elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    a = make_inputs(model, seed=0).batches[0]["x"]
    assert a.dtype == dtype and a.shape == (1, 3, 4, 4)
    np.testing.assert_array_equal(a, make_inputs(model, seed=0).batches[0]["x"])
    assert not np.array_equal(a, make_inputs(model, seed=1).batches[0]["x"])


@pytest.mark.parametrize(("batch", "batch_size", "sizes"), [(1, 64, [1] * 10), ("N", 4, [4, 4, 2]), ("N", 64, [10]), (2, 4, [2] * 5)])
def test_npz_batching(batch, batch_size, sizes, npz):
    x = samples(10)
    labels = np.arange(10) % CLASSES
    inputs = make_inputs(classifier(batch), data=npz(x=x, labels=labels), batch_size=batch_size)
    assert [len(b["x"]) for b in inputs.batches] == sizes
    assert inputs.samples == 10 and inputs.source == "data.npz (10 samples)"
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in inputs.batches]), x)
    np.testing.assert_array_equal(inputs.labels, labels)


def test_npz_fixed_batch_drops_incomplete_batch_and_max_samples(npz):
    path = npz(x=samples(10), label=np.arange(10) % CLASSES)
    inputs = make_inputs(classifier(batch=4), data=path)
    assert [len(b["x"]) for b in inputs.batches] == [4, 4] and len(inputs.labels) == 8
    inputs = make_inputs(classifier("N"), data=path, max_samples=3, batch_size=2)
    assert [len(b["x"]) for b in inputs.batches] == [2, 1] and inputs.labels.tolist() == [0, 1, 2]
    assert inputs.source == "data.npz (3 samples)"


def test_npz_scalar_and_broadcast_inputs(npz):
    ids = np.arange(30).reshape(5, 6)
    path = npz(
        ids=ids, mask=np.ones((5, 6), bool), pixels=np.ones((5, 6), np.int32), sr=np.array(16000),
        __broadcast__=np.array(["pixels"]),
    )
    # "pixels" (broadcast) is fed whole, so its 5 rows must equal each batch's rows: use batches of 5.
    inputs = make_inputs(mixed_types(), data=path, batch_size=5)
    assert len(inputs.batches) == 1
    feeds = inputs.batches[0]
    assert feeds["sr"].dtype == np.int64 and feeds["sr"].shape == () and int(feeds["sr"]) == 16000
    assert feeds["pixels"].dtype == np.uint8  # cast to the input type
    (y,) = run_ort(mixed_types(), feeds)
    np.testing.assert_array_equal(y, (ids + 1) * 16000.0)
    inputs = make_inputs(mixed_types(), data=npz("b.npz", ids=ids, mask=ids > 3, pixels=ids.astype(np.uint8), sr=np.array(8000)), batch_size=2)
    assert [len(b["ids"]) for b in inputs.batches] == [2, 2, 1]
    assert all(b["sr"].shape == () for b in inputs.batches)


def test_npz_input_named_y_is_not_labels(npz):
    model = classifier("N")
    model.graph.input[0].name = "y_in"
    model.graph.node[0].input[0] = "y_in"
    inputs = make_inputs(model, data=npz(y_in=samples(3), y=np.array([0, 1, 2])))
    assert inputs.labels.tolist() == [0, 1, 2]


def test_npz_one_hot_labels(npz):
    labels = np.array([3, 0, 4])
    inputs = make_inputs(classifier("N"), data=npz(x=samples(3), labels=np.eye(CLASSES)[labels]))
    assert inputs.labels.tolist() == labels.tolist()


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"z": np.zeros((2, 3, 4, 4))}, r"no array for input\(s\) x; npz keys: z; model inputs: x"),
        ({"x": np.zeros((2, 3, 5, 4))}, r"axis 2 is fixed at 4, got 5"),
        ({"x": np.zeros((2, 48))}, r"has rank 2 but input 'x' is declared \[N, 3, 4, 4\]"),
        ({"x": np.zeros((3, 3, 4, 4)), "labels": np.zeros(2, int)}, r"disagree on the number of samples.*x 3, labels 2"),
        ({"x": np.zeros((3, 3, 4, 4)), "labels": np.array([0.5, 1, 2])}, r"one integer class per sample"),
        ({"x": np.zeros((2, 3, 4, 4)), "__broadcast__": np.array(["q"])}, r"lists q, which are not model inputs"),
        ({"x": np.zeros((0, 3, 4, 4))}, r"no samples"),
    ],
)
def test_npz_errors(arrays, match, npz):
    with pytest.raises(UsageError, match=match):
        make_inputs(classifier("N"), data=npz(**arrays))


def test_npz_fewer_samples_than_fixed_batch(npz):
    with pytest.raises(UsageError, match="2 samples, fewer than the model's fixed batch dimension 4"):
        make_inputs(classifier(4), data=npz(x=samples(2)))


def test_npz_bad_files(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        make_inputs(classifier(), data=tmp_path / "missing.npz")
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(UsageError, match="single array, not an .npz archive"):
        make_inputs(classifier(), data=tmp_path / "one.npy")
    (tmp_path / "text.npz").write_text("not numpy at all")
    with pytest.raises(UsageError, match="not a readable .npz archive"):
        make_inputs(classifier(), data=tmp_path / "text.npz")


def test_npz_nan_is_a_usage_error(npz):
    """An npz full of NaN used to validate as 'top-1 agree 1.0000'; now it names the array and the sample."""
    x = samples(10)
    x[4:] = np.nan
    with pytest.raises(UsageError) as info:
        make_inputs(classifier("N"), data=npz("bad.npz", x=x))
    assert str(info.value) == "array 'x' in bad.npz holds NaN at sample 4; remove or fix that sample"


def test_make_inputs_takes_every_data_form(npz, tmp_path):
    x = samples(6)
    labels = np.arange(6) % CLASSES
    np.savez(tmp_path / "arrays.npz", x=x, labels=labels)
    (tmp_path / "loader.py").write_text(
        "import numpy as np\n"
        f"def batches():\n    d = np.load({str(tmp_path / 'arrays.npz')!r})\n"
        "    return [{'x': d['x'][i:i + 4], 'labels': d['labels'][i:i + 4]} for i in (0, 4)]\n"
    )
    model = classifier("N")
    from_npz = make_inputs(model, data=npz(x=x, labels=labels), batch_size=4)
    from_script = make_inputs(model, data=f"{tmp_path / 'loader.py'}:batches")
    from_list = make_inputs(model, data=[{"x": x[:4], "labels": labels[:4]}, {"x": x[4:], "labels": labels[4:]}])
    from_generator = make_inputs(model, data=({"x": x[i:i + 4], "labels": labels[i:i + 4]} for i in (0, 4)))
    for inputs in (from_npz, from_script, from_list, from_generator):
        assert [len(b["x"]) for b in inputs.batches] == [4, 2] and inputs.samples == 6
        np.testing.assert_array_equal(np.concatenate([b["x"] for b in inputs.batches]), x)
        np.testing.assert_array_equal(inputs.labels, labels)
    assert from_npz.source == "data.npz (6 samples)" and from_script.source == "loader.py:batches (6 samples)"
    assert make_inputs(model, data=from_script.feeds, max_samples=5).samples == 5  # an open FeedSource, limited


def test_make_inputs_image_folder(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for i in range(3):
        pil.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    from onnxfactor.data import ImageSpec

    inputs = make_inputs(classifier("N"), data=tmp_path, images=ImageSpec(mean=(0.5,), std=(0.5,)), batch_size=2)
    assert inputs.source == f"images in {tmp_path.name}/ (3 files, stretch 4x4)" and inputs.samples == 3
    assert inputs.labels is None and inputs.first["x"].shape == (2, 3, 4, 4)
    assert -1.0 <= inputs.first["x"].min() and inputs.first["x"].max() <= 1.0


@pytest.mark.parametrize(("option", "value"), [("max_samples", 0), ("batch_size", 0)])
def test_make_inputs_bad_counts(option, value):
    with pytest.raises(UsageError):
        make_inputs(classifier(), **{option: value})


# ------------------------------------------------------------------------------------------------
# Comparison metrics


def test_compare_identical_outputs():
    a = np.random.default_rng(0).standard_normal((6, CLASSES)).astype(np.float32)
    (c,) = compare_outputs({"y": a}, {"y": a.copy()})
    assert c == OutputComparison("y", 0.0, 0.0, 1.0, 1.0)


def test_compare_matches_numpy_over_batches():
    rng = np.random.default_rng(1)
    a = [rng.standard_normal((n, 7)).astype(np.float32) for n in (4, 4, 2)]
    b = [x + 0.05 * rng.standard_normal(x.shape).astype(np.float32) for x in a]
    b[0][0] = a[0][0] * -1  # changes one sample's argmax
    (c,) = compare_outputs([{"y": x} for x in a], [{"y": x} for x in b])
    fa, fb = np.concatenate(a).astype(np.float64), np.concatenate(b).astype(np.float64)
    assert c.max_abs == pytest.approx(np.abs(fa - fb).max(), rel=1e-12)
    assert c.rel_l2 == pytest.approx(rel_l2(fa, fb), rel=1e-9)
    assert c.cosine == pytest.approx(np.dot(fa.ravel(), fb.ravel()) / np.linalg.norm(fa) / np.linalg.norm(fb), rel=1e-9)
    assert c.top1_agreement == pytest.approx(np.mean(fa.argmax(1) == fb.argmax(1)))
    assert c.top1_agreement < 1.0


@pytest.mark.parametrize(
    ("shape", "dtype", "classifier_like"),
    [((3, 5), np.float32, True), ((3, 5, 1, 1), np.float32, True), ((3, 5, 1), np.float16, True),
     ((3, 1), np.float32, False), ((3, 5, 2, 2), np.float32, False), ((15,), np.float32, False), ((3, 5), np.int64, False)],
)
def test_top1_only_for_classifier_like_outputs(shape, dtype, classifier_like):
    a = np.arange(np.prod(shape)).reshape(shape).astype(dtype)
    (c,) = compare_outputs({"y": a}, {"y": a})
    assert (c.top1_agreement == 1.0) if classifier_like else (c.top1_agreement is None)


def test_compare_zero_and_nonfinite_outputs():
    z = np.zeros((2, 3), np.float32)
    c = compare_outputs({"y": z}, {"y": z})[0]
    assert (c.max_abs, c.rel_l2, c.cosine) == (0.0, 0.0, 1.0)
    c = compare_outputs({"y": z}, {"y": z + 1})[0]
    assert c.cosine == 0.0 and c.rel_l2 > 1e30
    nan = z.copy()
    nan[0, 1] = np.nan
    c = compare_outputs({"y": z}, {"y": nan})[0]
    assert c.rel_l2 == np.inf and np.isnan(c.cosine) and np.isnan(c.max_abs)
    inf = np.array([[1.0, -np.inf, 2.0]], np.float32)
    c = compare_outputs({"y": inf}, {"y": inf.copy()})[0]  # the same infinity in both: agreement
    assert (c.max_abs, c.rel_l2, c.cosine) == (0.0, 0.0, 1.0)
    c = compare_outputs({"y": inf}, {"y": np.array([[1.0, np.inf, 2.0]], np.float32)})[0]
    assert c.rel_l2 == np.inf and c.max_abs == np.inf and np.isnan(c.cosine)


def test_compare_shape_mismatch_and_missing_output():
    with pytest.raises(ValidationFailed, match=r"output 'y' has shape \(2, 3\) in the original model but \(2, 4\)"):
        compare_outputs({"y": np.zeros((2, 3))}, {"y": np.zeros((2, 4))})
    with pytest.raises(UsageError, match="no output 'y'"):
        compare_outputs({"y": np.zeros(2)}, {"z": np.zeros(2)})


# ------------------------------------------------------------------------------------------------
# Latency


class _FakeSession:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def get_outputs(self):
        return []

    def run(self, names, feeds):
        self.log.append(self.name)
        return []


def test_measure_latency_interleaves_after_warmup():
    calls = []
    stats = measure_latency([_FakeSession("A", calls), _FakeSession("B", calls)], {}, runs=4, warmup=2)
    assert calls == ["A", "B"] * 6
    assert [s.runs for s in stats] == [4, 4]


def test_measure_latency_on_real_sessions():
    sessions = [make_session(classifier(), CPU, threads=1, measuring=True) for _ in range(2)]
    stats = measure_latency(sessions, {"x": samples(1)}, runs=7, warmup=1)
    assert len(stats) == 2
    for s in stats:
        assert s.runs == 7 and s.median_ms > 0 and s.p10_ms <= s.median_ms <= s.p90_ms


def test_measure_latency_rejects_zero_runs():
    with pytest.raises(UsageError):
        measure_latency([], {}, runs=0)


# ------------------------------------------------------------------------------------------------
# validate()


def test_validate_identical_models():
    model = classifier("N")
    inputs = make_inputs(model, shapes={"x": (8, 3, 4, 4)})
    result = validate(model, classifier("N"), inputs=inputs, providers=CPU, threads=1, latency_runs=3)
    (c,) = result.outputs
    assert (c.name, c.max_abs, c.rel_l2, c.cosine, c.top1_agreement) == ("y", 0.0, 0.0, 1.0, 1.0)
    assert result.samples == 8 and result.input_source == "random (seed 0)" and result.providers == CPU
    assert result.accuracy_original is None and result.accuracy_compressed is None
    assert result.latency_original.runs == 3 and result.latency_compressed.runs == 3
    assert result.latency_original.median_ms > 0 and result.speedup > 0
    assert result.passed(0.0)
    d = result.to_dict()
    assert d["worst_rel_l2"] == 0.0 and d["outputs"][0]["top1_agreement"] == 1.0
    assert json.loads(json.dumps(d))["latency_compressed"]["runs"] == 3


def test_validate_perturbed_model_and_accuracy(npz, tmp_path):
    delta = np.array([0.3, -0.2, 0.0, 0.5, -0.4], np.float32)
    original, perturbed = classifier("N"), classifier("N", bias_delta=delta)
    x = samples(10, seed=5)
    labels = np.random.default_rng(7).integers(0, CLASSES, 10)
    inputs = make_inputs(original, data=npz(x=x, labels=labels), batch_size=4)
    onnx.save(perturbed, tmp_path / "perturbed.onnx")  # one model from a path, one from memory
    result = validate(original, tmp_path / "perturbed.onnx", inputs=inputs, providers=CPU, latency_runs=0)

    (ya,) = run_ort(original, {"x": x})
    (yb,) = run_ort(perturbed, {"x": x})
    np.testing.assert_allclose(yb - ya, np.broadcast_to(delta, ya.shape), atol=1e-5)  # the known delta
    (c,) = result.outputs
    assert c.rel_l2 == pytest.approx(rel_l2(ya, yb), rel=1e-6)
    assert c.max_abs == pytest.approx(np.abs(ya.astype(np.float64) - yb).max(), rel=1e-6)
    assert c.top1_agreement == pytest.approx(np.mean(ya.argmax(1) == yb.argmax(1)))
    assert result.accuracy_original == pytest.approx(np.mean(ya.argmax(1) == labels))
    assert result.accuracy_compressed == pytest.approx(np.mean(yb.argmax(1) == labels))
    assert result.samples == 10 and result.input_source == "data.npz (10 samples)"
    assert result.latency_original is None and result.speedup is None
    assert result.passed(c.rel_l2) and not result.passed(c.rel_l2 * 0.999)


def test_validate_batches_equal_one_big_batch(npz):
    """Fixed batch 1 (10 runs) and one run of 10 give the same metrics for the same samples."""
    delta = np.full(CLASSES, 0.1, np.float32)
    x = samples(10)
    per_sample = validate(classifier(1), classifier(1, bias_delta=delta), inputs=make_inputs(classifier(1), data=npz(x=x)), providers=CPU, latency_runs=0)
    one_run = validate(classifier(10), classifier(10, bias_delta=delta), inputs=make_inputs(classifier(10), data=npz("b.npz", x=x)), providers=CPU, latency_runs=0)
    assert per_sample.outputs[0].rel_l2 == pytest.approx(one_run.outputs[0].rel_l2, rel=1e-6)
    assert per_sample.outputs[0].top1_agreement == one_run.outputs[0].top1_agreement


def test_validate_streams_batches(monkeypatch):
    """validate() reads the source batch by batch: it never asks for the list of all batches."""
    from onnxfactor.validation.inputs import InputSet as Inputs

    delta = np.array([0.3, -0.2, 0.0, 0.5, -0.4], np.float32)
    x = samples(10, seed=5)
    labels = np.random.default_rng(7).integers(0, CLASSES, 10)
    model, perturbed = classifier("N"), classifier("N", bias_delta=delta)
    generator = ({"x": x[i:i + 3], "labels": labels[i:i + 3]} for i in range(0, 10, 3))
    inputs = make_inputs(model, data=generator)
    monkeypatch.setattr(Inputs, "batches", property(lambda self: pytest.fail("validate held every batch")))
    result = validate(model, perturbed, inputs=inputs, providers=CPU, latency_runs=2)
    (ya,) = run_ort(model, {"x": x})
    (yb,) = run_ort(perturbed, {"x": x})
    assert result.samples == 10 and result.input_source == "generator of feed dicts (10 samples)"
    assert result.outputs[0].rel_l2 == pytest.approx(rel_l2(ya, yb), rel=1e-6)
    assert result.accuracy_original == pytest.approx(np.mean(ya.argmax(1) == labels))
    assert result.accuracy_compressed == pytest.approx(np.mean(yb.argmax(1) == labels))
    assert result.latency_original.runs == 2


def test_validate_runs_large_batches_in_parts_and_times_one_sample(npz, monkeypatch):
    """A batch whose input exceeds VALIDATION_RUN_BYTES is run in parts (same metrics as one run);
    latency is timed on its first sample; a fixed batch axis is never split."""
    import onnxfactor.validation.compare as compare_mod

    delta = np.array([0.3, -0.2, 0.0, 0.5, -0.4], np.float32)
    x = samples(10, seed=5)
    labels = np.random.default_rng(7).integers(0, CLASSES, 10)
    model, perturbed = classifier("N"), classifier("N", bias_delta=delta)
    whole = validate(model, perturbed, inputs=make_inputs(model, data=npz(x=x, labels=labels)), providers=CPU, latency_runs=0)
    seen = []
    real_run = compare_mod._run
    monkeypatch.setattr(compare_mod, "_run", lambda s, feeds, *a: seen.append(feeds["x"].shape[0]) or real_run(s, feeds, *a))
    monkeypatch.setattr(compare_mod, "VALIDATION_RUN_BYTES", 3 * x[0].nbytes)
    parts = validate(model, perturbed, inputs=make_inputs(model, data=npz("b.npz", x=x, labels=labels)), providers=CPU, latency_runs=2)
    assert seen == [3, 3, 3, 3, 3, 3, 1, 1]  # original and compressed take turns on parts of 3 samples
    assert parts.outputs[0].rel_l2 == pytest.approx(whole.outputs[0].rel_l2, rel=1e-9)
    assert parts.outputs[0].top1_agreement == whole.outputs[0].top1_agreement and parts.samples == 10
    assert parts.accuracy_compressed == whole.accuracy_compressed
    assert parts.latency_shapes == {"x": [1, *x.shape[1:]]}
    seen.clear()
    fixed = validate(classifier(10), classifier(10, bias_delta=delta), inputs=make_inputs(classifier(10), data=npz("c.npz", x=x)),
                     providers=CPU, latency_runs=1)
    assert seen == [10, 10] and fixed.latency_shapes == {"x": [10, *x.shape[1:]]}


def test_validate_errors(tmp_path):
    model = classifier()
    inputs = make_inputs(model)
    other = classifier()
    other.graph.output[0].name = "logits"
    other.graph.node[-1].output[0] = "logits"
    with pytest.raises(UsageError, match="different outputs: original y; compressed logits"):
        validate(model, other, inputs=inputs, providers=CPU, latency_runs=0)
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    with pytest.raises(InputModelError, match="cannot load the compressed model"):
        validate(model, tmp_path / "bad.onnx", inputs=inputs, providers=CPU, latency_runs=0)
    wrong = InputSet(batches=[{"x": np.zeros((1, 3, 5, 5), np.float32)}], labels=None, source="test")
    with pytest.raises(UsageError, match="failed to run the original model on test"):
        validate(model, model, inputs=wrong, providers=CPU, latency_runs=0)


def test_run_batches_returns_named_outputs():
    session = make_session(classifier(), CPU)
    outs = run_batches(session, [{"x": samples(1)}, {"x": samples(1, seed=2)}])
    assert [list(o) for o in outs] == [["y"], ["y"]] and outs[0]["y"].shape == (1, CLASSES)


# ------------------------------------------------------------------------------------------------
# ValidationResult


def _result(*rel_l2s, lo=None, lc=None):
    outputs = [OutputComparison(f"o{i}", r, r, 1.0, None) for i, r in enumerate(rel_l2s)]
    return ValidationResult(outputs=outputs, samples=1, input_source="t", providers=CPU, latency_original=lo, latency_compressed=lc)


@pytest.mark.parametrize(
    ("rel_l2s", "threshold", "passed"),
    [((0.01, 0.02), None, True), ((0.01, 0.02), 0.02, True), ((0.01, 0.02), 0.019, False), ((0.0,), 0.0, True),
     ((np.inf,), 1e6, False), ((np.inf,), None, True), ((), 0.0, True)],
)
def test_passed(rel_l2s, threshold, passed):
    assert _result(*rel_l2s).passed(threshold) is passed


def test_passed_rejects_negative_threshold():
    with pytest.raises(UsageError, match="--max-rel-error"):
        _result(0.1).passed(-0.5)


def test_worst_and_speedup():
    lo, lc = LatencyStats(4.0, 3.0, 5.0, 10), LatencyStats(2.0, 1.5, 2.5, 10)
    result = _result(0.1, 0.3, 0.2, lo=lo, lc=lc)
    assert result.worst_rel_l2 == 0.3 and result.speedup == 2.0
    d = result.to_dict()
    assert d["speedup"] == 2.0 and d["latency_original"] == {"median_ms": 4.0, "p10_ms": 3.0, "p90_ms": 5.0, "runs": 10}
    assert _result(0.1).speedup is None


def test_worst_channel_error_judges_every_channel_of_a_detector_head():
    """``worst_channel_error``: plain relative L2 for ``N x C`` outputs; for ``N x C x anchors`` the
    worst channel's relative error, so class scores in [0, 1] beside box coordinates in pixels
    count (the whole output's relative L2 does not see a 50 % class-score error); batches
    accumulate; the worst output counts; non-finite values give inf unless equal in both."""
    from onnxfactor.validation.compare import compare_outputs, worst_channel_error

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, 10))
    noisy = logits + 0.1 * rng.standard_normal((8, 10))
    plain = compare_outputs({"y": logits}, {"y": noisy})[0].rel_l2
    assert worst_channel_error({"y": logits}, {"y": noisy}) == pytest.approx(plain, rel=1e-12)

    boxes = rng.uniform(0, 320, (2, 4, 100))
    scores = rng.uniform(0, 1, (2, 2, 100))
    head = np.concatenate([boxes, scores], axis=1)
    hurt = head.copy()
    hurt[:, 4] *= 0.5  # the first class's scores halved: that channel's relative error is 0.5
    hurt[:, 5] *= 0.9  # the second's by a tenth
    assert compare_outputs({"y": head}, {"y": hurt})[0].rel_l2 < 0.01
    worst = worst_channel_error({"y": head}, {"y": hurt})
    assert worst == pytest.approx(0.5, rel=1e-9)
    halves = [{"y": head[:1], "z": logits}, {"y": head[1:], "z": logits}]
    assert worst_channel_error(halves, [{"y": hurt[:1], "z": noisy}, {"y": hurt[1:], "z": noisy}]) == pytest.approx(worst)
    assert worst_channel_error([{"z": logits}, {"z": logits}], [{"z": noisy}, {"z": 9 * logits}]) > 1
    bad = hurt.copy()
    bad[0, 0, 0] = np.nan
    assert worst_channel_error({"y": head}, {"y": bad}) == float("inf")
    masked = head.copy()
    masked[0, 5, :3] = -np.inf
    same = hurt.copy()
    same[0, 5, :3] = -np.inf
    assert worst_channel_error({"y": masked}, {"y": same}) == pytest.approx(0.5, rel=1e-9)
    # an axis 1 that changes size from batch to batch (a sequence length) is no channel axis
    seq = [rng.standard_normal((1, t, 5)) for t in (3, 7)]
    off = [x + 0.1 * rng.standard_normal(x.shape) for x in seq]
    whole = compare_outputs([{"s": x} for x in seq], [{"s": x} for x in off])[0].rel_l2
    assert worst_channel_error([{"s": x} for x in seq], [{"s": x} for x in off]) == pytest.approx(whole, rel=1e-12)
