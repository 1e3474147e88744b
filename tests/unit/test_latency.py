"""onnxfactor.latency: per-layer micro models, activation fusion after the rewrite, timers."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper, numpy_helper

from onnxfactor.analysis import find_conv_sites, infer_shapes
from onnxfactor.errors import UsageError
from onnxfactor.io import load_model
from onnxfactor.latency import (
    FakeTimer,
    LayerTiming,
    OrtTimer,
    PairTiming,
    chain_model,
    layer_feeds,
    layer_model,
    layer_models,
    macs_cost,
    node_cost,
    time_layer,
)
from onnxfactor.methods import tucker2
from onnxfactor.methods.base import conv_macs
from onnxfactor.rewrite import Rewriter, export_model
from tests.conftest import full_rank_entry, make_conv_model, rel_l2, run_ort

ort = pytest.importorskip("onnxruntime")

CPU = ["CPUExecutionProvider"]


def conv_sites(model: onnx.ModelProto):
    """``(graph, sites)`` as the pipeline's ``_prepare`` finds them (fixed input shapes)."""
    loaded = load_model(model)
    shapes = infer_shapes(loaded.model, {})
    graph = gs.import_onnx(loaded.model)
    sites, _ = find_conv_sites(graph, shapes)
    return loaded.model, graph, sites


def site_of(model: onnx.ModelProto, name: str = "conv"):
    return next(s for s in conv_sites(model)[2] if s.name == name)


def full_rank_chain(site):
    ranks = full_rank_entry(site.weight_shape, site.geometry.group)
    return tucker2.decompose(site.weight_array(), site.geometry, ranks)


def append_nodes(model: onnx.ModelProto, nodes, inits=(), output: str = "z") -> onnx.ModelProto:
    """``model`` (one Conv writing ``y``) followed by ``nodes``; the graph output becomes ``output``."""
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)
    elem = model.graph.output[0].type.tensor_type.elem_type
    del model.graph.output[:]
    rank = len(model.graph.input[0].type.tensor_type.shape.dim)
    model.graph.output.append(helper.make_tensor_value_info(output, elem, [None] * rank))
    onnx.checker.check_model(model)
    return model


GEOMETRIES = {
    "plain": {"pads": [1, 1, 1, 1]},
    "stride2": {"strides": [2, 2], "pads": [1, 1, 1, 1]},
    "asymmetric_pads": {"pads": [0, 1, 2, 1]},
    "dilation": {"dilations": [2, 2], "pads": [2, 1, 2, 1]},
    "auto_pad_same_stride2": {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    "group2": {"group": 2, "pads": [1, 1, 1, 1]},
    "1d": {"kernel": (3,), "spatial": (17,), "strides": [2], "pads": [1, 0]},
    "pointwise": {"kernel": (1, 1)},
    "no_bias": {"bias": False, "strides": [1, 2]},
    "fp16": {"dtype": np.float16, "pads": [1, 1, 1, 1]},
}


@pytest.mark.parametrize("kwargs", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_micro_models_compute_the_layer_and_its_full_rank_chain(kwargs):
    model = make_conv_model(8, 12, **kwargs)
    site = site_of(model)
    chain = full_rank_chain(site)

    original, decomposed = layer_models(site, chain)

    dtype = np.dtype(kwargs.get("dtype", np.float32))
    feeds = layer_feeds(original)
    assert list(feeds) == ["x"] and feeds["x"].dtype == dtype and feeds["x"].shape == site.input_shape
    assert [o.name for o in original.graph.output] == [o.name for o in decomposed.graph.output] == ["y"]
    assert [n.op_type for n in decomposed.graph.node] == ["Conv"] * len(chain.convs)
    assert {numpy_helper.to_array(t).dtype for t in decomposed.graph.initializer} == {dtype}
    onnx.checker.check_model(decomposed, full_check=True)
    (full,) = run_ort(model, feeds)
    (micro,) = run_ort(original, feeds)
    (chained,) = run_ort(decomposed, feeds)
    assert micro.dtype == chained.dtype == dtype
    assert rel_l2(full, micro) <= 1e-6
    assert rel_l2(micro, chained) <= (5e-3 if dtype == np.float16 else 1e-4)


def test_micro_model_of_an_inner_conv_matches_the_full_model_on_its_input():
    """x -> conv -> Relu -> conv2 -> z: conv2's micro model fed with conv2's real input gives z."""
    rng = np.random.default_rng(1)
    w2 = numpy_helper.from_array(rng.standard_normal((6, 12, 3, 3)).astype(np.float32), "w2")
    model = append_nodes(
        make_conv_model(8, 12, pads=[1, 1, 1, 1]),
        [helper.make_node("Relu", ["y"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "w2"], ["z"], name="conv2", strides=[2, 1], pads=[0, 1, 1, 0])],
        [w2],
    )
    site = site_of(model, "conv2")
    original, decomposed = layer_models(site, full_rank_chain(site))
    assert [i.name for i in original.graph.input] == ["r"]

    x = np.random.default_rng(2).standard_normal((1, 8, 11, 13)).astype(np.float32)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.ValueInfoProto(name="r"))
    z, r = run_ort(probe, {"x": x})
    assert rel_l2(z, run_ort(original, {"r": r})[0]) <= 1e-6
    assert rel_l2(z, run_ort(decomposed, {"r": r})[0]) <= 1e-4


def test_layer_model_includes_a_fusable_activation_only_when_it_is_the_sole_consumer():
    relu = append_nodes(make_conv_model(), [helper.make_node("Relu", ["y"], ["z"], name="relu")])
    elu = append_nodes(make_conv_model(), [helper.make_node("Elu", ["y"], ["z"], name="elu")])
    shared = append_nodes(
        make_conv_model(),
        [helper.make_node("Relu", ["y"], ["r"], name="relu"), helper.make_node("Add", ["y", "r"], ["z"], name="add")],
    )

    assert [n.op_type for n in layer_model(site_of(relu)).graph.node] == ["Conv", "Relu"]
    assert [o.name for o in layer_model(site_of(relu)).graph.output] == ["z"]
    assert [n.op_type for n in layer_model(site_of(relu), with_activation=False).graph.node] == ["Conv"]
    assert [n.op_type for n in layer_model(site_of(elu)).graph.node] == ["Conv"]
    assert [n.op_type for n in layer_model(site_of(shared)).graph.node] == ["Conv"]


@pytest.mark.parametrize("opset", [10, 17])
def test_clip_bounds_are_kept_in_the_layer_model(opset):
    """Clip's bounds are attributes before opset 11 and constant inputs from 11 on; both become inputs."""
    if opset < 11:
        clip = helper.make_node("Clip", ["y"], ["z"], name="clip", min=-0.5, max=2.0)
        inits = []
    else:
        clip = helper.make_node("Clip", ["y", "lo", "hi"], ["z"], name="clip")
        inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("lo", -0.5), ("hi", 2.0))]
    model = append_nodes(make_conv_model(opset=opset, pads=[1, 1, 1, 1]), [clip], inits)
    site = site_of(model)

    original, decomposed = layer_models(site, full_rank_chain(site), opset=opset)

    assert [n.op_type for n in original.graph.node] == ["Conv", "Clip"]
    assert [n.op_type for n in decomposed.graph.node][-1] == "Clip"
    feeds = layer_feeds(original)
    (full,) = run_ort(model, feeds)
    assert full.min() == pytest.approx(-0.5) and full.max() == pytest.approx(2.0)
    assert rel_l2(full, run_ort(original, feeds)[0]) <= 1e-6
    assert rel_l2(full, run_ort(decomposed, feeds)[0]) <= 1e-4


def test_layer_model_needs_a_known_input_shape():
    site = site_of(make_conv_model())
    site.input_shape = (None, 8, 11, 13)
    with pytest.raises(ValueError, match="input-shape"):
        layer_model(site)


def test_chain_model_rejects_a_chain_of_another_conv():
    other = site_of(make_conv_model(4, 12))
    layer = layer_model(site_of(make_conv_model(8, 12)))
    with pytest.raises(ValueError, match="8 -> 12 channels but the chain maps 4 -> 12"):
        chain_model(layer, full_rank_chain(other))


def optimized_nodes(model: onnx.ModelProto, level: str, path) -> list[onnx.NodeProto]:
    """The nodes of ``model`` after ONNX Runtime's CPU graph optimisations at ``level``."""
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.optimized_model_filepath = str(path)
    options.log_severity_level = 3  # ORT warns that an ORT_ENABLE_ALL model is hardware-specific
    ort.InferenceSession(model.SerializeToString(), options, providers=CPU)
    return list(onnx.load(str(path)).graph.node)


def fused_activations(nodes) -> list[tuple[str, str]]:
    return [
        (n.name, a.s.decode()) for n in nodes for a in n.attribute if a.name == "activation"
    ]


@pytest.mark.parametrize("level", ["ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"])
def test_relu_stays_fused_into_the_last_conv_of_the_chain(level, tmp_path):
    """ORT fuses Conv + Relu (FusedConv at EXTENDED, NCHWc Conv with activation at ALL on x86).

    The rewrite keeps that fusion: the chain's last conv writes the tensor the Relu reads.
    """
    model = append_nodes(make_conv_model(32, 48, spatial=(12, 12), pads=[1, 1, 1, 1]),
                         [helper.make_node("Relu", ["y"], ["z"], name="relu")])
    _, graph, (site,) = conv_sites(model)
    chain = full_rank_chain(site)
    new_names = Rewriter(graph).replace(site, chain, share_key=("conv",))
    rewritten = export_model(graph, load_model(model).model)

    before = optimized_nodes(model, level, tmp_path / "before.onnx")
    after = optimized_nodes(rewritten, level, tmp_path / "after.onnx")

    for nodes in (before, after):
        assert "Relu" not in [n.op_type for n in nodes]
        assert [act for _, act in fused_activations(nodes)] == ["Relu"]
    if level == "ORT_ENABLE_EXTENDED":  # the fused node keeps the Conv's name
        assert [(n.op_type, n.domain) for n in after if n.name == new_names[-1]] == [("FusedConv", "com.microsoft")]
        assert fused_activations(after) == [(new_names[-1], "Relu")]
    x = np.random.default_rng(0).standard_normal((1, 32, 12, 12)).astype(np.float32)
    assert rel_l2(run_ort(model, {"x": x})[0], run_ort(rewritten, {"x": x})[0]) <= 1e-4


# --------------------------------------------------------------------------- timers


def test_macs_cost_counts_conv_macs_and_nodes():
    model = make_conv_model(8, 12, strides=[2, 2], pads=[1, 1, 1, 1])  # output 6 x 7
    macs = conv_macs((12, 8, 3, 3), 6 * 7)
    assert macs_cost(model, per_mac_ms=1e-3, per_node_ms=0.5) == pytest.approx(macs * 1e-3 + 0.5)
    eight_times = macs_cost(make_conv_model(8, 96), per_node_ms=0)
    assert eight_times == pytest.approx(8 * macs_cost(make_conv_model(8, 12), per_node_ms=0))


def test_macs_cost_prefers_one_big_conv_when_nodes_are_expensive():
    site = site_of(make_conv_model(32, 32, spatial=(16, 16), pads=[1, 1, 1, 1]))
    low_rank = tucker2.decompose(site.weight_array(), site.geometry, {"out": 8, "in": 8})
    original, decomposed = layer_models(site, low_rank)

    assert macs_cost(decomposed, per_node_ms=0) < macs_cost(original, per_node_ms=0) / 4
    expensive_nodes = functools.partial(macs_cost, per_mac_ms=1e-6, per_node_ms=2.0)  # 2.4 M MACs against 0.3 M
    assert expensive_nodes(decomposed) > expensive_nodes(original)


def test_fake_timer_is_deterministic_and_records_calls():
    site = site_of(make_conv_model(16, 16, pads=[1, 1, 1, 1]))
    chain = tucker2.decompose(site.weight_array(), site.geometry, {"out": 4, "in": 4})
    timer = FakeTimer()

    first = time_layer(timer, site, chain)
    second = time_layer(timer, site, chain)

    assert first == second
    assert len(timer.calls) == 2
    a, b, feeds = timer.calls[0]
    assert first.original_ms == pytest.approx(macs_cost(a)) and first.chain_ms == pytest.approx(macs_cost(b))
    assert first.speedup == pytest.approx(first.original_ms / first.chain_ms) and first.speedup > 1
    assert first.to_dict() == {
        "original_ms": first.original_ms, "chain_ms": first.chain_ms, "runs": 1, "converged": True,
        "speedup": first.speedup,
    }
    assert list(feeds) == ["x"]


def test_node_cost_reads_a_table_keyed_by_node_names():
    site = site_of(make_conv_model())
    original, decomposed = layer_models(site, full_rank_chain(site))
    table = {"conv": 3.0, "conv/tucker2_in": 1.0, "conv/tucker2_core": 1.0}
    timing = FakeTimer(node_cost(table, default=0.5)).time_pair(original, decomposed, layer_feeds(original))
    assert tuple(timing) == (3.0, 2.5)
    assert timing.ratio == pytest.approx(2.5 / 3.0)


def test_ort_timer_sees_that_eight_times_the_macs_take_longer():
    small = make_conv_model(16, 16, spatial=(32, 32), pads=[1, 1, 1, 1])
    big = make_conv_model(16, 128, spatial=(32, 32), pads=[1, 1, 1, 1])
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 16, 32, 32)).astype(np.float32)}

    timing = OrtTimer(CPU, threads=1).time_pair(small, big, feeds)

    assert isinstance(timing, PairTiming)
    small_ms, big_ms = timing
    assert small_ms > 0 and big_ms > 0
    assert 20 <= timing.a.runs == timing.b.runs <= 100
    assert big_ms > 1.5 * small_ms  # 8x the MACs; measured about 5x, the margin absorbs a busy machine
    assert LayerTiming.from_pair(timing).speedup == pytest.approx(small_ms / big_ms)


@pytest.mark.parametrize(
    "kwargs", [{"batch": 0}, {"batch": 60}, {"min_runs": 200}, {"rel_tol": 0}, {"max_seconds": -1}, {"warmup": -1}]
)
def test_ort_timer_rejects_bad_settings(kwargs):
    with pytest.raises(UsageError):
        OrtTimer(CPU, **kwargs)


def test_ort_timer_stops_at_max_runs_without_claiming_convergence():
    model = make_conv_model(4, 4, spatial=(8, 8))
    feeds = layer_feeds(model)
    timing = OrtTimer(CPU, threads=1, batch=5, min_runs=10, max_runs=10, warmup=1).time_pair(model, model, feeds)
    assert timing.a.runs == timing.b.runs == 10
    assert not timing.converged
