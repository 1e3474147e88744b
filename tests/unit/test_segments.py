"""Cuts through a graph (onnxfactor.calibration.segments): runs from a cut equal runs from the inputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfactor.calibration.probe import Probe
from onnxfactor.calibration.segments import Frontier, crossing
from tests.conftest import rel_l2

ort = pytest.importorskip("onnxruntime")
CPU = ["CPUExecutionProvider"]


def residual_model(channels: int = 16, seed: int = 0) -> onnx.ModelProto:
    """x -> a (3x3) -> Relu -> b (3x3) -> Add(skip from the Relu) -> c (3x3) -> Concat(c, Relu) -> d (1x1)
    -> Mul by the second input ``s`` (one scale per sample), read only at the end; the Relu's output is a second graph output."""
    rng = np.random.default_rng(seed)

    def conv(name, x, c_in, c_out, k):
        w = numpy_helper.from_array((rng.standard_normal((c_out, c_in, k, k)) / np.sqrt(c_in * k * k)).astype(np.float32), name + ".w")
        b = numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32) * 0.1, name + ".b")
        node = helper.make_node("Conv", [x, w.name, b.name], [name + ".y"], name=name, kernel_shape=[k, k], pads=[k // 2] * 4)
        return node, [w, b]

    nodes, inits = [], []
    for name, x, c_in, c_out, k in (("a", "x", 3, channels, 3),):
        n, i = conv(name, x, c_in, c_out, k)
        nodes.append(n)
        inits += i
    nodes.append(helper.make_node("Relu", ["a.y"], ["r"], name="relu"))
    n, i = conv("b", "r", channels, channels, 3)
    nodes.append(n)
    inits += i
    nodes.append(helper.make_node("Add", ["b.y", "r"], ["sum"], name="add"))
    n, i = conv("c", "sum", channels, channels, 3)
    nodes.append(n)
    inits += i
    nodes.append(helper.make_node("Concat", ["c.y", "r"], ["cat"], name="cat", axis=1))
    n, i = conv("d", "cat", 2 * channels, 4, 1)
    nodes.append(n)
    inits += i
    nodes.append(helper.make_node("Mul", ["d.y", "s"], ["out"], name="scale"))
    graph = helper.make_graph(
        nodes, "residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12]), helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 1, 1, 1])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None] * 4), helper.make_tensor_value_info("r", TensorProto.FLOAT, [None] * 4)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _feeds(count: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 3, 12, 12)).astype(np.float32), "s": np.full((2, 1, 1, 1), 0.5 + i, dtype=np.float32)}
            for i in range(count)]


def test_crossing_names_the_skip_and_the_late_input():
    g = residual_model().graph
    assert crossing(g, 0) == ["x", "s"]
    assert crossing(g, 2) == ["s", "r"]  # after the Relu: the skip tensor feeds b, Add, Concat and is an output
    assert crossing(g, 4) == ["s", "r", "sum"]  # before c: the Add's output and the Relu's (Concat, graph output)
    assert crossing(g, 6) == ["s", "r", "cat"]
    assert crossing(g, len(g.node)) == ["r", "out"]  # everything computed: the graph outputs


@pytest.mark.parametrize("position", range(8))
def test_runs_from_every_cut_equal_runs_from_the_inputs(position):
    model = residual_model()
    feeds = _feeds(3)
    names = ["out", "r", "c.y", "b.y"]
    expected = [Probe(model, names, CPU, prune=True).run(f) for f in feeds]
    front = Frontier(feeds, budget=1e9)
    assert front.advance(model, position, CPU) and front.at_inputs == (position == 0)
    got = list(front.run(model, names, CPU))
    for e, o in zip(expected, got):  # names before the cut (b.y, c.y) are recomputed from the cut's tensors
        for n in names:
            assert rel_l2(o[n], e[n]) < 1e-6, (position, n)
    # moving on from there to a later cut, then running, still equals the full run
    if position < 7:
        assert front.advance(model, 7, CPU)
        assert all(rel_l2(o["out"], e["out"]) < 1e-6 for e, o in zip(expected, front.run(model, ["out"], CPU)))


def test_a_model_that_differs_after_the_cut_runs_from_it():
    """The frontier was computed on one model; a model whose weights differ only after the cut runs
    from it as from its own inputs (what the correction relies on)."""
    model = residual_model()
    feeds = _feeds(2)
    front = Frontier(feeds, budget=1e9)
    front.advance(model, 4, CPU)
    changed = onnx.ModelProto.FromString(model.SerializeToString())
    for t in changed.graph.initializer:
        if t.name.startswith(("c.", "d.")):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.5, t.name))
    expected = [Probe(changed, ["out"], CPU).run(f)["out"] for f in feeds]
    got = [o["out"] for o in front.run(changed, ["out"], CPU)]
    original = [Probe(model, ["out"], CPU).run(f)["out"] for f in feeds]
    assert all(rel_l2(g, e) < 1e-6 for g, e in zip(got, expected))
    assert all(rel_l2(g, o) > 0.1 for g, o in zip(got, original))


def test_a_frontier_over_its_budget_stays_where_it_is():
    model = residual_model()
    feeds = _feeds(4)
    per_dict = 2 * 16 * 12 * 12 * 4 * 2 + 8  # r and sum of 2 samples, float32, plus s
    tight = Frontier(feeds, budget=4 * per_dict - 1)
    assert not tight.advance(model, 4, CPU) and tight.at_inputs and tight.names == ["x", "s"] and tight.moves == 0
    enough = Frontier(feeds, budget=4 * per_dict)
    assert enough.advance(model, 4, CPU) and enough.names == ["s", "r", "sum"] and enough.nbytes == 4 * per_dict
    assert not Frontier(feeds, budget=0).advance(model, 4, CPU)


@pytest.mark.parametrize("overlap", [True, False])
def test_run_ahead_yields_in_order_and_advances_only_after_each_run(overlap):
    """``run_ahead``: results in item order; the iterator is advanced only once the current run
    returned (so a run may set what the iterator reads next), never more than one item ahead of
    the caller; a run's exception reaches the caller."""
    from onnxfactor.calibration.probe import run_ahead

    state = {"runs": 0, "advanced": 0}

    def items():
        for i in range(5):
            assert state["runs"] == i  # the previous item's run has returned
            state["advanced"] += 1
            yield i

    def run(i):
        state["runs"] += 1
        return i * i

    seen = []
    for item, value in run_ahead(run, items(), overlap):
        assert state["advanced"] <= item + 2  # at most the next item is taken
        seen.append((item, value))
    assert seen == [(i, i * i) for i in range(5)]

    def fails(i):
        if i == 2:
            raise ValueError("run 2")
        return i

    got = []
    with pytest.raises(ValueError, match="run 2"):
        for item, _ in run_ahead(fails, range(5), overlap):
            got.append(item)
    assert got == [0, 1]


def test_probe_returns_arrays_it_owns_and_sequence_outputs_as_lists():
    """Probe.run fetches tensors without a copy (OrtValues): the arrays stay valid after later runs
    reuse ONNX Runtime's memory; a sequence output (no tensor) falls back to session.run's lists."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("SequenceConstruct", ["y", "x"], ["s"])],
                              "g", [x], [y, seq])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    tensors = Probe(model, ["y"], ["CPUExecutionProvider"])
    a = np.arange(8, dtype=np.float32).reshape(2, 4) - 3
    first = tensors.run({"x": a})["y"]
    for k in range(5):
        tensors.run({"x": a * (k + 10)})
    np.testing.assert_array_equal(first, np.maximum(a, 0))
    both = Probe(model, ["y", "s"], ["CPUExecutionProvider"]).run({"x": a})
    assert isinstance(both["s"], list) and len(both["s"]) == 2
    np.testing.assert_array_equal(both["s"][1], a)
    np.testing.assert_array_equal(both["y"], np.maximum(a, 0))
