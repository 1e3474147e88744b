"""onnxfactor.io: loading real and broken files, Constant/ConstantOfShape folding, atomic saving."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxfactor.io as io_mod
from onnxfactor.errors import InputModelError, OutputError
from onnxfactor.io import LoadedModel, load_model, restore_conventions, save_model_atomic

ort = pytest.importorskip("onnxruntime")


# ------------------------------------------------------------------------------------------------
# Locating the real models shipped inside installed packages (find_spec does not import them:
# rapidocr_onnxruntime would need cv2, silero_vad torch).


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"package {package} is not installed")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        pytest.skip(f"{package} does not ship {relative}")
    return path


def light_model(name: str) -> Path:
    return _package_file("onnx", f"backend/test/data/light/light_{name}.onnx")


def cls_model() -> Path:
    return _package_file("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx")


def silero_model() -> Path:
    return _package_file("silero_vad", "data/silero_vad.onnx")


def run_ort(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3  # the folded models leave unused __SHAPE initializers: ORT warns
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, feeds)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------
# Tiny models


def tiny_conv_model(ir_version: int = 8, opset: int = 13, weights_as_inputs: bool = False) -> onnx.ModelProto:
    """x[1,2,5,5] -> Conv(w[3,2,3,3], b[3]) -> y; with ``weights_as_inputs`` w and b are also graph inputs."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])]
    if weights_as_inputs:
        inputs += [
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 2, 3, 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [3]),
        ]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        "tiny",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 5, 5])],
        initializer=[w, b],
    )
    return helper.make_model(graph, ir_version=ir_version, opset_imports=[helper.make_opsetid("", opset)])


def constants_model() -> onnx.ModelProto:
    """Every Constant form, a ConstantOfShape fed by a Constant, and constants that must stay nodes."""
    weight = np.arange(3 * 2 * 3 * 3, dtype=np.float32).reshape(3, 2, 3, 3) / 100
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weight)),
        helper.make_node("Constant", [], ["f"], value_float=1.5),
        helper.make_node("Constant", [], ["fs"], value_floats=[1.0, 2.0]),
        helper.make_node("Constant", [], ["i"], value_int=7),
        helper.make_node("Constant", [], ["is"], value_ints=[3]),
        helper.make_node("Constant", [], ["s"], value_string="kept"),
        helper.make_node(
            "Constant",
            [],
            ["sp"],
            sparse_value=helper.make_sparse_tensor(
                numpy_helper.from_array(np.array([5.0], np.float32), "v"),
                numpy_helper.from_array(np.array([1], np.int64), "ix"),
                [4],
            ),
        ),
        helper.make_node("Constant", [], ["out_const"], value_floats=[9.0]),  # a graph output: stays a node
        helper.make_node("ConstantOfShape", ["is"], ["b"]),  # default value: float32 zeros
        helper.make_node("ConstantOfShape", ["is"], ["bi"], value=numpy_helper.from_array(np.array([4], np.int64))),
        helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "constants",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 5, 5]),
            helper.make_tensor_value_info("out_const", TensorProto.FLOAT, [1]),
        ],
    )
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 13)])


def initializer_map(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in graph.initializer}


# ------------------------------------------------------------------------------------------------
# Broken inputs


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _first_half(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) // 2]


BROKEN_FILES = {
    "empty": lambda tmp: _write(tmp, "empty.onnx", b""),
    "text": lambda tmp: _write(tmp, "notes.onnx", b"this is a README, not a model\n" * 20),
    "png": lambda tmp: _write(tmp, "image.onnx", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))),
    "truncated_alexnet": lambda tmp: _write(tmp, "alexnet_half.onnx", _first_half(light_model("bvlc_alexnet"))),
    "truncated_cls": lambda tmp: _write(tmp, "cls_half.onnx", _first_half(cls_model())),
    "no_graph": lambda tmp: _write(tmp, "no_graph.onnx", onnx.ModelProto(ir_version=8).SerializeToString()),
}


@pytest.mark.parametrize("kind", sorted(BROKEN_FILES))
def test_broken_file_is_an_input_model_error_naming_the_file(tmp_path, kind):
    path = BROKEN_FILES[kind](tmp_path)
    with pytest.raises(InputModelError) as info:
        load_model(path)
    message = str(info.value)
    assert path.name in message
    assert "\n" not in message
    assert info.value.exit_code == 4


@pytest.mark.parametrize("kind", ["empty", "text", "png", "truncated_cls"])
def test_not_onnx_messages_hint_at_the_file_type(tmp_path, kind):
    with pytest.raises(InputModelError, match="is this an ONNX file"):
        load_model(BROKEN_FILES[kind](tmp_path))


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.onnx"
    with pytest.raises(InputModelError, match=r"^input model not found: .*nowhere\.onnx$"):
        load_model(path)


def test_directory(tmp_path):
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    with pytest.raises(InputModelError, match="model.onnx is a directory"):
        load_model(folder)


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "locked.onnx"
    onnx.save(tiny_conv_model(), path)

    # Root reads mode-000 files, so simulate the permission error the OS gives other users.
    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(InputModelError, match=r"cannot read input model .*locked\.onnx: permission denied"):
        load_model(path)


def test_checker_failure_is_reported_with_its_first_line(tmp_path):
    model = tiny_conv_model()
    model.graph.node.append(helper.make_node("NoSuchOp", ["y"], ["z"]))
    path = tmp_path / "bad_op.onnx"
    onnx.save(model, path)
    with pytest.raises(InputModelError) as info:
        load_model(path)
    assert "bad_op.onnx fails onnx.checker" in str(info.value)
    assert "NoSuchOp" in str(info.value)
    assert "\n" not in str(info.value)


def test_checker_runs_on_a_modelproto_source_too():
    model = tiny_conv_model()
    model.graph.node.append(helper.make_node("NoSuchOp", ["y"], ["z"]))
    with pytest.raises(InputModelError, match="fails onnx.checker.*NoSuchOp"):
        load_model(model)


def test_missing_external_data_names_the_data_file(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(tiny_conv_model(), path, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(InputModelError) as info:
        load_model(path)
    assert "ext.onnx.data" in str(info.value)
    assert "not found" in str(info.value)


# ------------------------------------------------------------------------------------------------
# Sources are never modified


def test_modelproto_source_is_copied_and_left_unchanged():
    source = constants_model()
    before = source.SerializeToString()
    loaded = load_model(source)
    assert source.SerializeToString() == before
    assert loaded.model is not source
    assert loaded.path is None
    assert loaded.external_data is False
    assert [n.op_type for n in loaded.model.graph.node] != [n.op_type for n in source.graph.node]


def test_input_file_is_not_modified(tmp_path):
    path = tmp_path / "cls.onnx"
    path.write_bytes(cls_model().read_bytes())
    digest, mtime = sha256(path), path.stat().st_mtime_ns
    loaded = load_model(path)
    assert loaded.path == path
    assert sha256(path) == digest
    assert path.stat().st_mtime_ns == mtime
    assert sorted(os.listdir(tmp_path)) == ["cls.onnx"]


# ------------------------------------------------------------------------------------------------
# Normalisation on tiny models


def test_constants_fold_into_initializers():
    loaded = load_model(constants_model())
    graph = loaded.model.graph
    inits = initializer_map(graph)

    np.testing.assert_array_equal(inits["w"], np.arange(54, dtype=np.float32).reshape(3, 2, 3, 3) / 100)
    assert inits["f"].dtype == np.float32 and inits["f"].shape == () and inits["f"] == 1.5
    np.testing.assert_array_equal(inits["fs"], np.array([1.0, 2.0], np.float32))
    assert inits["i"].dtype == np.int64 and inits["i"].shape == () and inits["i"] == 7
    np.testing.assert_array_equal(inits["is"], np.array([3], np.int64))
    # ConstantOfShape fed by a folded Constant: default float32 zeros, and an explicit int64 value.
    assert inits["b"].dtype == np.float32
    np.testing.assert_array_equal(inits["b"], np.zeros(3, np.float32))
    assert inits["bi"].dtype == np.int64
    np.testing.assert_array_equal(inits["bi"], np.full(3, 4, np.int64))

    # value_string, sparse_value and the graph-output constant stay nodes, in their original order.
    assert [(n.op_type, n.output[0]) for n in graph.node] == [
        ("Constant", "s"),
        ("Constant", "sp"),
        ("Constant", "out_const"),
        ("Conv", "y"),
    ]
    assert len(loaded.folded) == 7
    assert "Constant 'w' -> initializer" in loaded.folded
    assert "ConstantOfShape 'b' -> initializer" in loaded.folded
    onnx.checker.check_model(loaded.model)

    x = np.random.default_rng(1).standard_normal((1, 2, 5, 5)).astype(np.float32)
    for before, after in zip(run_ort(constants_model(), {"x": x}), run_ort(loaded.model, {"x": x})):
        np.testing.assert_array_equal(after, before)


def test_ir3_weight_inputs_are_dropped_and_restored():
    model = tiny_conv_model(ir_version=3, opset=9, weights_as_inputs=True)
    loaded = load_model(model)
    assert loaded.ir_version == 3
    assert loaded.model.ir_version == 3
    assert [value.name for value in loaded.model.graph.input] == ["x"]

    restored = restore_conventions(loaded.model, loaded.ir_version)
    assert restored is loaded.model  # in place, returned for chaining
    inputs = {value.name: value.type.tensor_type for value in restored.graph.input}
    assert list(inputs) == ["x", "w", "b"]
    assert inputs["w"].elem_type == TensorProto.FLOAT
    assert [d.dim_value for d in inputs["w"].shape.dim] == [3, 2, 3, 3]
    onnx.checker.check_model(restored)


def test_ir4_input_with_initializer_is_an_overridable_default_and_stays():
    """From IR 4 an initializer that is also an input is not a constant: keep it, and do not fold from it."""
    model = tiny_conv_model(ir_version=8, weights_as_inputs=True)
    model.graph.initializer.append(numpy_helper.from_array(np.array([3], np.int64), "bias_shape"))
    model.graph.input.append(helper.make_tensor_value_info("bias_shape", TensorProto.INT64, [1]))
    model.graph.node.insert(0, helper.make_node("ConstantOfShape", ["bias_shape"], ["zeros"]))
    model.graph.node[1].input[2] = "zeros"  # Conv(x, w, zeros)

    loaded = load_model(model)
    assert [value.name for value in loaded.model.graph.input] == ["x", "w", "b", "bias_shape"]
    assert [n.op_type for n in loaded.model.graph.node] == ["ConstantOfShape", "Conv"]
    assert loaded.folded == []
    assert restore_conventions(loaded.model, 8).SerializeToString() == loaded.model.SerializeToString()


def if_model(ir_version: int = 8, opset: int = 13) -> onnx.ModelProto:
    """y = If(cond, Conv(x, Constant 1.0), Conv(x, Constant -1.0)): weights in Constant nodes of the branches."""

    def branch(name: str, scale: float) -> onnx.GraphProto:
        weight = numpy_helper.from_array(np.full((3, 2, 1, 1), scale, np.float32))
        return helper.make_graph(
            [
                helper.make_node("Constant", [], [f"{name}_w"], value=weight),
                helper.make_node("Conv", ["x", f"{name}_w"], [f"{name}_y"], name=f"{name}_conv"),
            ],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, 3, 5, 5])],
        )

    graph = helper.make_graph(
        [
            helper.make_node(
                "If", ["cond"], ["y"], name="if", then_branch=branch("then", 1.0), else_branch=branch("else", -1.0)
            )
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 5, 5])],
    )
    return helper.make_model(graph, ir_version=ir_version, opset_imports=[helper.make_opsetid("", opset)])


def test_subgraph_constants_land_in_the_subgraph():
    model = if_model()
    loaded = load_model(model)
    if_node = loaded.model.graph.node[0]
    for attr in if_node.attribute:
        assert [n.op_type for n in attr.g.node] == ["Conv"]
        assert [init.name for init in attr.g.initializer] == [attr.g.node[0].input[1]]
    assert len(loaded.model.graph.initializer) == 0
    assert "Constant 'then_w' (in If 'if'.then_branch) -> initializer" in loaded.folded

    x = np.ones((1, 2, 5, 5), np.float32)
    for cond, expected in ((True, 2.0), (False, -2.0)):
        (y,) = run_ort(loaded.model, {"x": x, "cond": np.array(cond)})
        np.testing.assert_array_equal(y, np.full((1, 3, 5, 5), expected, np.float32))


def test_ir3_subgraph_constants_stay_nodes():
    """IR < 4 would need subgraph initializers listed as subgraph inputs, which If branches cannot take."""
    loaded = load_model(if_model(ir_version=3, opset=9))
    for attr in loaded.model.graph.node[0].attribute:
        assert [n.op_type for n in attr.g.node] == ["Constant", "Conv"]
        assert len(attr.g.initializer) == 0
    assert loaded.folded == []
    onnx.checker.check_model(restore_conventions(loaded.model, 3))


# ------------------------------------------------------------------------------------------------
# Normalisation on real files


@pytest.mark.parametrize("name", ["bvlc_alexnet", "squeezenet", "resnet50"])
def test_light_models_weights_become_initializers(name):
    path = light_model(name)
    original = onnx.load(path)
    loaded = load_model(path)
    graph = loaded.model.graph
    inits = {init.name for init in graph.initializer}

    assert loaded.ir_version == original.ir_version == 3
    assert loaded.external_data is False
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == sum(n.op_type == "Conv" for n in original.graph.node) > 0
    assert all(conv.input[1] in inits for conv in convs)
    assert not [value.name for value in graph.input if value.name in inits]
    assert not [n for n in graph.node if n.op_type == "ConstantOfShape"]
    assert len(loaded.folded) == sum(n.op_type == "ConstantOfShape" for n in original.graph.node)
    # Everything else is kept: node order, opsets, IR version.
    assert [n.name or n.output[0] for n in graph.node] == [
        n.name or n.output[0] for n in original.graph.node if n.op_type != "ConstantOfShape"
    ]
    assert loaded.model.opset_import == original.opset_import
    assert loaded.model.ir_version == 3

    # The light models fill every weight with 0.02 (shapes from the __SHAPE initializers).
    by_name = {init.name: init for init in graph.initializer}
    weight = numpy_helper.to_array(by_name[convs[0].input[1]])
    assert weight.shape == tuple(numpy_helper.to_array(by_name[convs[0].input[1] + "__SHAPE"]))
    assert np.all(weight == np.float32(0.02))

    onnx.checker.check_model(restore_conventions(loaded.model, loaded.ir_version))


def test_light_squeezenet_runs_the_same_after_restore():
    path = light_model("squeezenet")
    loaded = load_model(path)
    restored = restore_conventions(loaded.model, loaded.ir_version)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    (before,), (after,) = run_ort(path, {"data_0": x}), run_ort(restored, {"data_0": x})
    assert after.shape == (1, 1000, 1, 1)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-6)


def test_ppocr_cls_constant_nodes_become_initializers():
    path = cls_model()
    loaded = load_model(path)
    graph = loaded.model.graph
    inits = {init.name for init in graph.initializer}

    assert loaded.ir_version == 7
    assert not [n for n in graph.node if n.op_type == "Constant"]
    assert len(loaded.folded) == sum(n.op_type == "Constant" for n in onnx.load(path).graph.node) == 308
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == 53 and all(conv.input[1] in inits for conv in convs)
    onnx.checker.check_model(loaded.model)

    x = np.random.default_rng(0).standard_normal((1, 3, 48, 192)).astype(np.float32)
    (before,), (after,) = run_ort(path, {"x": x}), run_ort(loaded.model, {"x": x})
    assert after.shape == (1, 2)
    np.testing.assert_array_equal(after, before)


def test_silero_vad_subgraph_conv_weights_become_subgraph_initializers():
    path = silero_model()
    loaded = load_model(path)
    if_nodes = [n for n in loaded.model.graph.node if n.op_type == "If"]
    assert len(if_nodes) == 1
    checked = 0
    for attr in if_nodes[0].attribute:
        sub = attr.g
        sub_inits = {init.name for init in sub.initializer}
        convs = [n for n in sub.node if n.op_type == "Conv"]
        assert len(convs) == 6
        assert all(conv.input[1] in sub_inits for conv in convs)
        assert not [n for n in sub.node if n.op_type == "Constant"]
        checked += len(convs)
    assert checked == 12
    onnx.checker.check_model(loaded.model)

    rng = np.random.default_rng(0)
    feeds = {
        "input": rng.standard_normal((1, 512)).astype(np.float32),
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(16000, np.int64),
    }
    before, after = run_ort(path, feeds), run_ort(loaded.model, feeds)
    assert [a.shape for a in after] == [(1, 1), (2, 1, 128)]
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------
# Atomic save


def test_save_writes_the_model_and_nothing_else(tmp_path):
    model = tiny_conv_model()
    seen: list[Path] = []
    result = save_model_atomic(model, tmp_path / "out.onnx", check=seen.append)
    assert result == tmp_path / "out.onnx"
    assert result.read_bytes() == model.SerializeToString()
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]
    # check ran on a temporary file next to the target, which is gone now.
    assert len(seen) == 1 and seen[0].parent == tmp_path and seen[0].name.startswith(".out.onnx.")
    assert not seen[0].exists()
    # Not the 0600 of mkstemp: what open() would have created.
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(result.stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("external", [False, True])
def test_failing_check_leaves_no_file_and_the_old_target_untouched(tmp_path, external):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous run")

    def failing_check(path: Path) -> None:
        assert path.is_file()
        raise OutputError("rewritten model fails onnx.checker: boom")

    with pytest.raises(OutputError, match="boom"):
        save_model_atomic(tiny_conv_model(), target, external_data=external, check=failing_check, size_threshold=0)
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]
    assert target.read_bytes() == b"previous run"


def test_failing_check_with_no_previous_target_leaves_an_empty_dir(tmp_path):
    def failing_check(path: Path) -> None:
        raise RuntimeError("ORT could not load it")

    with pytest.raises(RuntimeError, match="ORT could not load it"):
        save_model_atomic(tiny_conv_model(), tmp_path / "out.onnx", check=failing_check)
    assert os.listdir(tmp_path) == []


def test_save_refuses_a_directory_target(tmp_path):
    with pytest.raises(OutputError, match=r"output path .* is a directory; give a file name"):
        save_model_atomic(tiny_conv_model(), tmp_path)


def test_save_refuses_a_missing_directory(tmp_path):
    with pytest.raises(OutputError, match=r"output directory does not exist: .*missing"):
        save_model_atomic(tiny_conv_model(), tmp_path / "missing" / "out.onnx")


def test_save_refuses_a_read_only_directory(tmp_path, monkeypatch):
    # Root may write anywhere, so check the message through the access test the code relies on.
    monkeypatch.setattr(io_mod.os, "access", lambda path, mode: False)
    with pytest.raises(OutputError, match=r"cannot write the output to .*: permission denied"):
        save_model_atomic(tiny_conv_model(), tmp_path / "out.onnx")
    assert os.listdir(tmp_path) == []


def test_external_data_roundtrip_of_every_tensor(tmp_path):
    """size_threshold=0 moves even the 3-element bias out; the caller's model is left as it was."""
    model = load_model(tiny_conv_model()).model
    before = model.SerializeToString()
    result = save_model_atomic(model, tmp_path / "tiny.onnx", external_data=True, size_threshold=0)
    assert model.SerializeToString() == before
    assert sorted(os.listdir(tmp_path)) == ["tiny.onnx", "tiny.onnx.data"]
    assert (tmp_path / "tiny.onnx.data").stat().st_size == (54 + 3) * 4

    saved = onnx.load(result, load_external_data=False)
    assert [init.data_location for init in saved.graph.initializer] == [TensorProto.EXTERNAL] * 2
    reloaded = load_model(result)
    assert reloaded.external_data is True
    for name, value in initializer_map(model.graph).items():
        np.testing.assert_array_equal(initializer_map(reloaded.model.graph)[name], value)


def test_external_data_roundtrip_of_a_real_model(tmp_path):
    """PP-OCR keeps its weights in float_data (not raw_data): they go external too, and come back equal."""
    model = load_model(cls_model()).model
    before = model.SerializeToString()
    x = np.random.default_rng(0).standard_normal((1, 3, 48, 192)).astype(np.float32)
    (expected,) = run_ort(model, {"x": x})
    seen: list[Path] = []

    def check(path: Path) -> None:
        seen.append(path)
        assert (path.parent / "cls.onnx.data").is_file()
        onnx.checker.check_model(str(path))
        (got,) = run_ort(path, {"x": x})
        np.testing.assert_array_equal(got, expected)

    result = save_model_atomic(model, tmp_path / "cls.onnx", external_data=True, check=check)
    assert model.SerializeToString() == before
    assert sorted(os.listdir(tmp_path)) == ["cls.onnx", "cls.onnx.data"]
    assert len(seen) == 1 and not seen[0].exists()
    assert result.stat().st_size < 0.2 * (tmp_path / "cls.onnx.data").stat().st_size

    reloaded = load_model(result)
    assert reloaded.external_data is True
    original, roundtrip = initializer_map(model.graph), initializer_map(reloaded.model.graph)
    assert list(roundtrip) == list(original)
    for name, value in original.items():
        assert roundtrip[name].dtype == value.dtype
        np.testing.assert_array_equal(roundtrip[name], value)
    (after,) = run_ort(reloaded.model, {"x": x})
    np.testing.assert_array_equal(after, expected)


def test_model_too_large_for_protobuf_switches_to_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(io_mod, "_serialise", lambda model: None)  # what a > 2 GiB model gives
    result = save_model_atomic(tiny_conv_model(), tmp_path / "big.onnx", size_threshold=0)
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    saved = initializer_map(onnx.load(result).graph)
    np.testing.assert_array_equal(saved["w"], initializer_map(tiny_conv_model().graph)["w"])


def test_ir3_save_after_restore_reloads_to_the_same_model(tmp_path):
    loaded = load_model(light_model("squeezenet"))
    model = restore_conventions(loaded.model, loaded.ir_version)
    out = save_model_atomic(model, tmp_path / "squeezenet.onnx", check=lambda path: onnx.checker.check_model(str(path)))
    again = load_model(out)
    assert again.ir_version == 3
    assert again.folded == []  # nothing left to fold
    assert [value.name for value in again.model.graph.input] == ["data_0"]
    assert initializer_map(again.model.graph).keys() == initializer_map(loaded.model.graph).keys()


def test_loaded_model_is_a_plain_dataclass():
    loaded = load_model(tiny_conv_model())
    assert isinstance(loaded, LoadedModel)
    assert loaded.folded == [] and loaded.ir_version == 8 and loaded.path is None


# ------------------------------------------------------------------------------------------------
# Writing without a second copy of the model; checking after the model is dropped


def _with_unknown_fields(where: str) -> onnx.ModelProto:
    """The tiny model with a field number onnx does not define, in the model, its graph or a tensor."""
    model = tiny_conv_model()
    message = {"model": model, "graph": model.graph, "tensor": model.graph.initializer[0]}[where]
    unknown = bytes([0xA8, 0x1F, 0x05])  # field 501, varint 5
    message.ParseFromString(message.SerializeToString() + unknown)
    return model


def _restored_squeezenet() -> onnx.ModelProto:
    loaded = load_model(light_model("squeezenet"))
    return restore_conventions(loaded.model, loaded.ir_version)


@pytest.mark.parametrize(
    "make",
    [
        tiny_conv_model,
        lambda: load_model(cls_model()).model,  # weights in float_data
        _restored_squeezenet,  # IR 3
        lambda: load_model(silero_model()).model,  # If subgraphs with initializers
        lambda: _with_unknown_fields("model"),
        lambda: _with_unknown_fields("graph"),
        lambda: _with_unknown_fields("tensor"),
    ],
    ids=["tiny", "ppocr_cls", "squeezenet_ir3", "silero_vad", "unknown_in_model", "unknown_in_graph", "unknown_in_tensor"],
)
def test_saved_bytes_are_those_of_serialize_to_string(tmp_path, make):
    """The model is written piece by piece (one tensor's bytes at a time), to the same bytes."""
    model = make()
    out = save_model_atomic(model, tmp_path / "m.onnx")
    assert out.read_bytes() == model.SerializeToString()


@pytest.mark.parametrize("external", [False, True])
def test_write_temporary_file_stands_without_the_model(tmp_path, external):
    import gc

    model = load_model(tiny_conv_model()).model
    expected = initializer_map(model.graph)
    target = tmp_path / "out.onnx"
    with io_mod.write_temporary(model, target, external_data=external, size_threshold=0) as written:
        del model
        gc.collect()
        assert written.path.is_file() and not target.exists()
        onnx.checker.check_model(str(written.path), full_check=True)
        assert written.commit() == target
    names = sorted(os.listdir(tmp_path))
    assert names == (["out.onnx", "out.onnx.data"] if external else ["out.onnx"])
    reloaded = load_model(target).model
    for name, value in expected.items():
        np.testing.assert_array_equal(initializer_map(reloaded.graph)[name], value)


@pytest.mark.parametrize("external", [False, True])
def test_write_temporary_not_committed_leaves_nothing(tmp_path, external):
    with io_mod.write_temporary(tiny_conv_model(), tmp_path / "out.onnx", external_data=external, size_threshold=0) as written:
        assert written.path.is_file()
    assert os.listdir(tmp_path) == []


def test_small_shape_holding_large_data_is_rejected():
    """A tensor declaring 4 floats but holding 100 000 is caught here (the basic checker does not look)."""
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], raw_data=np.zeros(100_000, np.float32).tobytes())
    graph = helper.make_graph(
        [helper.make_node("Relu", ["w"], ["y"])], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [w]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(InputModelError, match=r"initializer 'w' holds 400000 values/bytes but its shape \[4\] needs 16"):
        load_model(model)


def test_save_refuses_a_large_tensor_whose_data_does_not_fill_its_shape(tmp_path):
    """Large tensors are written by their declared size: one that does not match fails, leaving no file."""
    model = tiny_conv_model()
    bad = model.graph.initializer.add()
    bad.name, bad.data_type = "bad", TensorProto.FLOAT
    bad.dims.append(100_000)
    bad.raw_data = np.zeros(50_000, np.float32).tobytes()
    with pytest.raises(OutputError, match=r"tensor 'bad': it holds 200000 bytes but its shape \[100000\] needs 400000"):
        save_model_atomic(model, tmp_path / "out.onnx")
    assert os.listdir(tmp_path) == []
