"""onnxfactor.calibration building blocks: tiles, streamed moments, least squares, whitening, activations."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfactor.calibration.activation import following_activation
from onnxfactor.calibration.correct import NormalEquations, plan_stages
from onnxfactor.calibration.fit import cholesky_whitening, unwhiten, whiten
from onnxfactor.calibration.statistics import Moments, TileReservoir
from onnxfactor.calibration.tiles import TileGeometry, apply_chain, explicit_pads, output_dims, valid_conv
from onnxfactor.methods import METHODS
from onnxfactor.methods.base import ConvGeometry
from tests.conftest import make_conv_model, rel_l2, run_ort
from tests.integration.test_full_rank_exactness import CASES

ort = pytest.importorskip("onnxruntime")


def _conv_case(kwargs):
    model = make_conv_model(**kwargs)
    weight = numpy_helper.to_array(model.graph.initializer[0])
    bias = numpy_helper.to_array(model.graph.initializer[1]) if kwargs.get("bias", True) else None
    attrs = {a.name: helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    geometry = ConvGeometry.from_attrs(attrs, weight.shape)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    return model, weight, bias, geometry, x


def _all_tiles(tile: TileGeometry, batch: int, count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, batch, count)
    origins = rng.integers(0, np.asarray(tile.origins()), size=(count, len(tile.origins())))
    return samples, origins


@pytest.mark.parametrize("kwargs", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_tiles_reproduce_the_onnx_runtime_output(kwargs):
    """A tile's input window, convolved without padding, gives exactly ONNX Runtime's output block:
    explicit pads (auto_pad resolved), strides, dilations and groups all land where ORT puts them."""
    model, weight, bias, geometry, x = _conv_case(kwargs)
    (y,) = run_ort(model, {"x": x})
    tile = TileGeometry.of(geometry, x.shape[2:])
    assert tile.out_dims == y.shape[2:] == output_dims(geometry, x.shape[2:])
    samples, origins = _all_tiles(tile, x.shape[0], 40)
    windows = tile.cut_inputs(x, samples, origins)
    got = valid_conv(windows, weight, geometry.group, geometry.strides, geometry.dilations)
    if bias is not None:
        got += bias.reshape(1, -1, *([1] * geometry.spatial_dims))
    expected = tile.cut_outputs(y, samples, origins)
    assert got.shape == expected.shape
    assert rel_l2(expected, got) < 1e-5


@pytest.mark.parametrize("method", ["tucker2", "cp3", "cp4", "tucker3"])
@pytest.mark.parametrize("case", ["k3", "per_axis_strides", "asym_pads_strided", "same_lower", "group2", "conv3d_strided_asym", "conv1d_strided_dilated"])
def test_apply_chain_equals_the_dense_weight_of_the_chain(method, case):
    """Running a chain conv by conv on tiles equals its dense weight (ChainSpec.reconstruct, which
    the exactness tests tie to ONNX Runtime) on the same tiles, for every method."""
    kwargs = dict(CASES)[case]
    _, weight, bias, geometry, x = _conv_case(kwargs)
    m = METHODS[method]
    spectra = m.weight_spectra(weight, geometry, in_mode=True)
    ranks = m.choose_ranks(spectra, __import__("onnxfactor").RankConfig(policy="ratio", ratio=0.5)).ranks
    chain = m.decompose(weight, geometry, ranks, spectra=spectra)
    tile = TileGeometry.of(geometry, x.shape[2:])
    windows = tile.cut_inputs(x, *_all_tiles(tile, x.shape[0], 25))
    dense = chain.reconstruct()
    expected = valid_conv(windows, dense, 1, geometry.strides, geometry.dilations)
    got = apply_chain(chain, geometry, windows, None)
    assert rel_l2(expected, got) < 1e-6


@pytest.mark.parametrize("auto_pad,size,kernel,stride,expected", [
    ("SAME_UPPER", 10, 3, 2, ([0], [1])),
    ("SAME_LOWER", 10, 3, 2, ([1], [0])),
    ("SAME_UPPER", 7, 4, 1, ([1], [2])),
    ("SAME_LOWER", 7, 4, 1, ([2], [1])),
    ("VALID", 7, 3, 1, ([0], [0])),
])
def test_explicit_pads_follow_onnx_auto_pad(auto_pad, size, kernel, stride, expected):
    geometry = ConvGeometry.from_attrs({"auto_pad": auto_pad, "strides": [stride]}, (2, 2, kernel))
    assert explicit_pads(geometry, (size,)) == expected


def test_moments_streamed_equal_full_batch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((23, 6, 5, 4)) * np.arange(1, 7).reshape(1, 6, 1, 1) + 3.0
    streamed = Moments.empty(6, 2)
    for start in range(0, 23, 7):
        streamed.add(x[start : start + 7].astype(np.float32))
    pixels = np.moveaxis(x.astype(np.float32).astype(np.float64), 1, 0).reshape(6, -1)
    assert streamed.count == pixels.shape[1] == streamed.gram_count
    np.testing.assert_allclose(streamed.mean, pixels.mean(axis=1), rtol=1e-6)
    for g in range(2):
        block = pixels[3 * g : 3 * g + 3]
        np.testing.assert_allclose(streamed.second(g), block @ block.T / pixels.shape[1], rtol=1e-5)
        np.testing.assert_allclose(streamed.covariance(g), np.cov(block, bias=True), rtol=1e-4, atol=1e-6)


def test_moments_subsample_huge_runs_without_bias():
    """Runs with more pixels than MAX_GRAM_COLUMNS use a random subset for the outer products."""
    from onnxfactor.calibration import statistics

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 3, 100, 100)) * np.array([1.0, 2.0, 0.5]).reshape(1, 3, 1, 1)).astype(np.float32)
    m = Moments.empty(3, 1)
    m.add(x, np.random.default_rng(0))
    assert m.gram_count == statistics.MAX_GRAM_COLUMNS < 2 * 100 * 100 == m.count
    np.testing.assert_allclose(np.diag(m.second(0)), [1.0, 4.0, 0.25], rtol=0.05)


def test_gram_columns_share_a_budget_per_layer_when_the_sample_count_is_known():
    from onnxfactor.calibration import statistics as st

    assert st.gram_columns(1, 256) == st.MIN_GRAM_COLUMNS == 1024           # 256 big inputs, one per run: 1024 x 256 = budget
    assert st.gram_columns(64, 1000) == st.MAX_GRAM_COLUMNS                # the bundled models' runs: unchanged
    assert st.gram_columns(4, 256) == st.GRAM_BUDGET * 4 // 256 == 4096
    assert st.gram_columns(1, 100_000) == st.MIN_GRAM_COLUMNS and st.gram_columns(1, None) == st.MAX_GRAM_COLUMNS
    assert [st.gram_columns(1, None, seen) for seen in (0, 31, 63, 255, 10_000)] == [8192, 8192, 4096, 1024, 1024]  # unknown total


def test_moments_with_unequal_column_shares_stay_unbiased():
    """Runs of different sizes and column shares: each column weighs the pixels it stands for, so
    the second moment matches the full-pixel one (a run of 4x the pixels counts 4x, whatever its share)."""
    rng = np.random.default_rng(2)
    scale = np.array([1.0, 2.0, 0.5]).reshape(1, 3, 1, 1)
    m, full = Moments.empty(3, 1), Moments.empty(3, 1)
    for k, (side, columns) in enumerate([(100, 8192), (200, 1024), (100, 2048), (50, 1024)]):
        x = (rng.standard_normal((1, 3, side, side)) * scale * (1.0 + k)).astype(np.float32)  # each run its own scale
        m.add(x, rng, columns)
        full.add(x, rng, columns=10**9)
    assert m.gram_count == 8192 + 1024 + 2048 + 1024 and m.gram_weight == m.count == full.count
    np.testing.assert_allclose(np.diag(m.second(0)), np.diag(full.second(0)), rtol=0.06)
    runs = [(100 * 100, 8192, 1.0), (200 * 200, 1024, 2.0), (100 * 100, 2048, 3.0), (50 * 50, 1024, 4.0)]
    by_columns = sum(c * f * f for _, c, f in runs) / sum(c for _, c, _ in runs)  # what equal column weights would give
    by_pixels = sum(p * f * f for p, _, f in runs) / sum(p for p, _, _ in runs)
    assert abs(by_columns / by_pixels - 1) > 0.15  # 20 %: this case tells the two apart
    np.testing.assert_allclose(np.diag(m.second(0)), by_pixels * np.array([1.0, 4.0, 0.25]), rtol=0.08)


def test_normal_equations_match_lstsq():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((500, 7))
    a_true, b_true = rng.standard_normal((4, 7)), rng.standard_normal(4)
    y = h @ a_true.T + b_true + 0.01 * rng.standard_normal((500, 4))
    eq = NormalEquations(7, 4)
    for start in range(0, 500, 64):
        eq.add(h[start : start + 64], y[start : start + 64])
    a0 = np.zeros((4, 7))
    a, b = eq.solve(a0, ridge=0.0)
    design = np.concatenate([h, np.ones((500, 1))], axis=1)
    ref = np.linalg.lstsq(design, y, rcond=None)[0]
    np.testing.assert_allclose(a, ref[:-1].T, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(b, ref[-1], rtol=1e-8, atol=1e-10)
    sq, norm = eq.error(a, b)
    assert sq == pytest.approx(float(np.sum((y - design @ ref) ** 2)), rel=1e-6)
    assert norm == pytest.approx(float(np.sum(y**2)), rel=1e-12)
    # ridge towards a0: the solution of the augmented least-squares problem (bias unpenalised, centred)
    a0 = rng.standard_normal((4, 7))
    ridge = 0.3
    a, b = eq.solve(a0, ridge=ridge)
    hc, yc = h - h.mean(0), y - y.mean(0)
    lam = ridge * np.trace(hc.T @ hc) / 7
    aug_x = np.concatenate([hc, np.sqrt(lam) * np.eye(7)])
    aug_y = np.concatenate([yc, np.sqrt(lam) * a0.T])
    ref = np.linalg.lstsq(aug_x, aug_y, rcond=None)[0].T
    np.testing.assert_allclose(a, ref, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(b, y.mean(0) - ref @ h.mean(0), rtol=1e-8, atol=1e-10)


def test_whitening_round_trip_is_exact_at_full_rank():
    """Tucker-2 of the whitened weight at full rank, unwhitened, is the weight again."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    geometry = ConvGeometry.from_attrs({"group": 2}, (6, 4, 3, 3))
    x = rng.standard_normal((2000, 8)) @ rng.standard_normal((8, 8))
    factors, inverses = [], []
    for g in range(2):
        block = x[:, 4 * g : 4 * g + 4]
        lower, inv = cholesky_whitening(block.T @ block / len(x), 1e-3)
        factors.append(lower)
        inverses.append(inv)
        np.testing.assert_allclose(lower @ inv, np.eye(4), atol=1e-10)
    whitened = whiten(weight.astype(np.float32), 2, factors)
    m = METHODS["tucker2"]
    spectra = m.weight_spectra(whitened.astype(np.float32), geometry, in_mode=True)
    chain = unwhiten(m.decompose(whitened.astype(np.float32), geometry, {"out": 3, "in": 4}, spectra=spectra), 2, inverses)
    from onnxfactor.methods.base import dense_weight

    assert rel_l2(dense_weight(weight, 2), chain.reconstruct()) < 1e-5
    assert cholesky_whitening(np.zeros((3, 3)), 1e-3)[0].tolist() == np.eye(3).tolist()


def test_reservoir_keeps_the_lowest_priorities_within_capacity():
    geometry = ConvGeometry.from_attrs({"pads": [1, 1, 1, 1]}, (2, 3, 3, 3))
    reservoir = TileReservoir(capacity=20)
    rng = np.random.default_rng(0)
    for start in range(0, 60, 6):
        x = rng.standard_normal((6, 3, 9, 9)).astype(np.float32)
        y = rng.standard_normal((6, 2, 9, 9)).astype(np.float32)
        reservoir.offer(rng, geometry, x, y, np.arange(6), np.arange(start, start + 6))
        assert reservoir.count <= 20
        # every kept window really is the input at its sample and origin
        assert reservoir.windows.shape[0] == reservoir.count
    assert reservoir.count == 20
    assert len(set(reservoir.samples.tolist())) > 5  # spread over the samples
    assert float(reservoir.priority.max()) < 0.5


def _graph(nodes, outputs=("z",)):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        initializer=[numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w"),
                     numpy_helper.from_array(np.array(0.0, np.float32), "lo"), numpy_helper.from_array(np.array(6.0, np.float32), "hi")],
    )
    g = gs.import_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    return next(n for n in g.nodes if n.op == "Conv"), g


@pytest.mark.parametrize("nodes,expected", [
    ([helper.make_node("Conv", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["z"])], ("Relu", {})),
    ([helper.make_node("Conv", ["x", "w"], ["y"]), helper.make_node("LeakyRelu", ["y"], ["z"], alpha=0.1)], ("LeakyRelu", {"alpha": 0.1})),
    ([helper.make_node("Conv", ["x", "w"], ["y"]), helper.make_node("Clip", ["y", "lo", "hi"], ["z"])], ("Clip", {"min": 0.0, "max": 6.0})),
    ([helper.make_node("Conv", ["x", "w"], ["y"]), helper.make_node("Sigmoid", ["y"], ["s"]), helper.make_node("Mul", ["y", "s"], ["z"])], ("SiLU", {})),
    ([helper.make_node("Conv", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["z"]), helper.make_node("Neg", ["y"], ["n"])], None),
    ([helper.make_node("Conv", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "x"], ["z"])], None),
])
def test_following_activation(nodes, expected):
    outputs = [n.output[0] for n in nodes[1:] if n.output[0] != "s"]
    conv, graph = _graph(nodes, outputs)
    act = following_activation(conv, graph)
    if expected is None:
        assert act is None
    else:
        assert (act.op, pytest.approx(act.params)) == (expected[0], expected[1])
        y = np.linspace(-8, 8, 33)
        ref = {"Relu": np.maximum(y, 0), "LeakyRelu": np.where(y > 0, y, 0.1 * y), "Clip": np.clip(y, 0, 6), "SiLU": y / (1 + np.exp(-y))}
        np.testing.assert_allclose(act.numpy(y), ref[expected[0]], rtol=1e-6)  # alpha is stored as float32


def test_plan_stages_covers_every_layer_in_order():
    assert plan_stages(0, 8) == []
    assert [list(r) for r in plan_stages(5, 8)] == [[0], [1], [2], [3], [4]]
    stages = plan_stages(63, 8)
    assert len(stages) == 8 and [i for r in stages for i in r] == list(range(63))
    assert [list(r) for r in plan_stages(3, 0)] == [[0], [1], [2]]  # --correction-passes 0: one pass per layer
    assert len(plan_stages(63, 0)) == 63 and len(plan_stages(63, 1)) == 1


@pytest.mark.parametrize("dims", [(9,), (7, 8), (5, 4, 6)])
def test_gather_blocks_equals_a_loop_of_slices_with_zero_padding(dims):
    """The one-gather cut of tiles equals slicing each block out of a zero-padded copy, for blocks
    inside, across and wholly outside the array, in 1-D, 2-D and 3-D; the dtype is kept."""
    from onnxfactor.calibration.tiles import gather_blocks

    rng = np.random.default_rng(len(dims))
    a = rng.standard_normal((3, 4, *dims)).astype(np.float32)
    extent = tuple(min(3, d) for d in dims)
    n = 40
    samples = rng.integers(0, 3, n)
    starts = np.stack([rng.integers(-4, d + 2, n) for d in dims], axis=1)
    starts[0] = 0  # one block inside
    starts[1] = [d + 5 for d in dims]  # one wholly outside
    pad = 10
    padded = np.pad(a, [(0, 0), (0, 0)] + [(pad, pad)] * len(dims))
    expected = np.stack([padded[(s, slice(None), *(slice(p + pad, p + pad + e) for p, e in zip(st, extent)))]
                         for s, st in zip(samples, starts)])
    got = gather_blocks(a, samples, starts, extent)
    assert got.dtype == np.float32 and got.shape == (n, 4, *extent)
    np.testing.assert_array_equal(got, expected)
    assert not got[1].any() and got[0].all()
