"""onnxfactor.rewrite.export_model: the loaded model is the output; kept weights are neither copied nor changed."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfactor import compress
from onnxfactor.rewrite import export_model
from tests.conftest import full_rank_entry, rel_l2, run_ort

pytest.importorskip("onnxruntime")

WEIGHT_SHAPE = (6, 4, 3, 3)


def conv_gemm_if_model() -> onnx.ModelProto:
    """x -> Conv(w, b) -> Flatten -> Gemm(fc_w, fc_b) -> If(cond: * scale, else: + scale) -> z.

    ``scale`` is a main-graph initializer read only inside the If branches; ``unused`` is used by nothing.
    """
    rng = np.random.default_rng(0)
    inits = {
        "w": rng.standard_normal(WEIGHT_SHAPE),
        "b": rng.standard_normal(6),
        "fc_w": rng.standard_normal((10, 6 * 6 * 6)),
        "fc_b": rng.standard_normal(10),
        "scale": rng.standard_normal(10),
        "unused": rng.standard_normal(3),
    }
    inits = [numpy_helper.from_array(value.astype(np.float32), name) for name, value in inits.items()]

    def branch(op: str) -> onnx.GraphProto:
        out = helper.make_tensor_value_info(f"{op.lower()}_out", TensorProto.FLOAT, [1, 10])
        return helper.make_graph([helper.make_node(op, ["logits", "scale"], [out.name], name=op.lower())], op, [], [out])

    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
        helper.make_node("If", ["cond"], ["z"], name="branch", then_branch=branch("Mul"), else_branch=branch("Add")),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_gemm_if",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def initializers_by_graph(graph: onnx.GraphProto, path: str = "main") -> list[tuple[str, onnx.TensorProto]]:
    """``(graph path, initializer)`` for the graph and, recursively, its subgraphs."""
    found = [(path, t) for t in graph.initializer]
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                found += initializers_by_graph(sub, f"{path}/{node.name}.{attr.name}")
    return found


def test_compress_stores_each_initializer_once_with_kept_values_bit_identical(full_rank_config):
    model = conv_gemm_if_model()
    source = model.SerializeToString()
    config = full_rank_config({"conv": full_rank_entry(WEIGHT_SHAPE, 1)})

    compressed, report = compress(model, config=config)

    assert [layer.status for layer in report.layers] == ["decomposed"]
    assert model.SerializeToString() == source  # the caller's model is not touched
    found = initializers_by_graph(compressed.graph)
    names = [t.name for _, t in found]
    assert len(names) == len(set(names)), f"initializers stored more than once: {sorted(names)}"
    where = {t.name: path for path, t in found}
    assert "w" not in where and "unused" not in where  # the replaced weight and the unused one are gone
    # Kept weights stay in the main graph (``scale`` too, though only the If branches read it).
    original = {t.name: t for t in model.graph.initializer}
    stored = {t.name: t for _, t in found}
    for name in ("b", "fc_w", "fc_b", "scale"):
        assert where[name] == "main"
        assert stored[name].raw_data == original[name].raw_data
        assert list(stored[name].dims) == list(original[name].dims)
    new = [name for name in names if name not in original]
    assert len(new) == len(report.layers[0].new_nodes) >= 2  # one factor weight per new Conv

    onnx.checker.check_model(compressed, full_check=True)
    x = np.random.default_rng(1).standard_normal((1, 4, 6, 6)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        (expected,), (got,) = run_ort(model, feeds), run_ort(compressed, feeds)
        assert rel_l2(expected, got) < 1e-5


def test_export_edits_the_model_in_place_without_copying_kept_initializers():
    model = conv_gemm_if_model()
    graph = gs.import_onnx(model)
    fc_w = next(t for t in model.graph.initializer if t.name == "fc_w")
    conv = next(node for node in graph.nodes if node.name == "conv")
    conv.inputs[1] = gs.Constant("w_new", np.ones(WEIGHT_SHAPE, np.float32))

    out = export_model(graph, model)

    assert out is model
    assert [t.name for t in out.graph.initializer] == ["b", "fc_w", "fc_b", "scale", "w_new"]
    # The same protobuf object: left where it was, not copied into a new model.
    assert next(t for t in out.graph.initializer if t.name == "fc_w") is fc_w
    np.testing.assert_array_equal(numpy_helper.to_array(out.graph.initializer[-1]), np.ones(WEIGHT_SHAPE, np.float32))
    assert [n.op_type for n in out.graph.node] == ["Conv", "Flatten", "Gemm", "If"]
    assert out.ir_version == 8 and [o.version for o in out.opset_import] == [17]
    onnx.checker.check_model(out, full_check=True)
