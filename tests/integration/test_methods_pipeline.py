"""Every registered method through the whole pipeline (rank file or VBMF -> rewrite -> ONNX Runtime)."""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxfactor import compress, validate
from onnxfactor.config import CompressConfig, RankConfig
from onnxfactor.methods import METHODS
from onnxfactor.validation.run import ValidationOptions
from tests.conftest import MODELS, make_conv_model, rel_l2, run_ort
from tests.integration.test_cp_exactness import CASES, I, O, RANK, TUCKER_RANKS, build_weight
from tools import model_zoo

PIPELINE_CASES = [c for c in CASES if c[0] in {"k3_pad1", "k5x3_asym_pads", "k3_strided_asym", "k4_same_lower", "group2", "conv1d", "conv3d_strided_asym"}]


@pytest.mark.parametrize("method", ["cp3", "cp4", "tucker3"])
@pytest.mark.parametrize("case", PIPELINE_CASES, ids=[c[0] for c in PIPELINE_CASES])
def test_exact_weights_through_the_pipeline(method, case, tmp_path):
    _, kernel, spatial, attrs, group, bias = case
    rng = np.random.default_rng(zlib.crc32(f"pipeline/{method}/{case[0]}".encode()))
    weight = build_weight(method, kernel, group, rng).astype(np.float32)
    model = make_conv_model(c_in=I * group, c_out=O * group, kernel=kernel, spatial=spatial, group=group, bias=bias, weight=weight, **attrs)
    if method == "tucker3":
        entry = {"out": TUCKER_RANKS[0], "in": TUCKER_RANKS[1], "spatial": min(TUCKER_RANKS[2], math.prod(kernel))}
    else:
        entry = {"rank": RANK}
    (tmp_path / "r.json").write_text(json.dumps({"conv": entry}))
    config = CompressConfig(
        ranks=RankConfig(policy="file", rank_file=tmp_path / "r.json"), method=method, min_reduction=None, in_mode_min_channels=0
    )
    compressed, report = compress(model, config=config)
    assert report.decomposed and report.decomposed[0].method.startswith(method[:2])
    assert report.decomposed[0].rel_reconstruction_error < 1e-5
    onnx.checker.check_model(compressed, full_check=True)
    x = rng.standard_normal((1, I * group, *spatial)).astype(np.float32)
    (expected,), (got,) = run_ort(model, {"x": x}), run_ort(compressed, {"x": x})
    assert rel_l2(expected, got) <= 1e-4


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bundled_model_with_every_method(method):
    data = MODELS / "fashion_mnist_test.npz"
    config = CompressConfig(ranks=RankConfig(policy="weakened", weaken=0.6), method=method)
    model, report = compress(MODELS / "fashion_cnn.onnx", config=config)
    assert len(report.decomposed) >= 4
    for layer in report.decomposed:
        assert layer.params_after < layer.params_before and 0 <= layer.rel_reconstruction_error < 1
        assert layer.method == method or layer.fallback
    onnx.checker.check_model(model, full_check=True)
    result = validate(MODELS / "fashion_cnn.onnx", model, options=ValidationOptions(data=data, max_samples=200, latency_runs=0))
    logits = run_ort(model, {"input": np.load(data)["input"][:200]})[0]
    assert result.accuracy_compressed == pytest.approx(float(np.mean(logits.argmax(1) == np.load(data)["labels"][:200])))


@pytest.mark.parametrize("method", ["cp3", "cp4", "tucker3"])
def test_alexnet_group2_with_cp_and_spatial_tucker(method):
    from onnxfactor import io

    loaded = io.load_model(model_zoo.light_model("bvlc_alexnet"))
    model = io.restore_conventions(model_zoo.with_random_weights(loaded.model, seed=1), loaded.ir_version)
    compressed, report = compress(model, config=CompressConfig(method=method))
    grouped = [layer for layer in report.decomposed if layer.group == 2]
    assert grouped, [(l.name, l.reason) for l in report.layers]
    groups = {n.name: helper.get_attribute_value(a) for n in compressed.graph.node for a in n.attribute if a.name == "group"}
    assert all(groups[n] >= 2 for layer in grouped for n in layer.new_nodes)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    (expected,), (got,) = run_ort(model, {model.graph.input[0].name: x})[:1], run_ort(compressed, {model.graph.input[0].name: x})[:1]
    assert got.shape == expected.shape and np.isfinite(got).all()


# ------------------------------------------------------------------------------------------------
# --method auto and the error policy


def test_auto_picks_cp_for_an_exact_cp_weight_and_keeps_the_output():
    from tests.unit.test_cp import exact_cp3

    rng = np.random.default_rng(11)
    weight = exact_cp3(rng, 16, 16, (3, 3), 3).astype(np.float32)
    model = make_conv_model(c_in=16, c_out=16, kernel=(3, 3), spatial=(12, 12), pads=[1, 1, 1, 1], weight=weight)
    config = CompressConfig(ranks=RankConfig(policy="error", target_error=1e-3), method="auto")
    compressed, report = compress(model, config=config)
    (layer,) = report.decomposed
    # rank-3 CP: 3 * (16 + 9 + 16) MACs per pixel, against Tucker-2's (3, 3): 16*3 + 3*3*9 + 3*16
    assert layer.method == "cp3" and layer.ranks == {"rank": 3}
    assert {c["method"] for c in layer.candidates} == set(METHODS)
    assert layer.rel_reconstruction_error <= 1e-3
    x = rng.standard_normal((1, 16, 12, 12)).astype(np.float32)
    (expected,), (got,) = run_ort(model, {"x": x}), run_ort(compressed, {"x": x})
    assert rel_l2(expected, got) <= 2e-3


def test_auto_is_never_worse_than_tucker2_at_the_policy_ranks():
    ranks = RankConfig(policy="weakened", weaken=0.6)
    _, plain = compress(MODELS / "fashion_cnn.onnx", config=CompressConfig(ranks=ranks, method="tucker2"))
    _, auto = compress(MODELS / "fashion_cnn.onnx", config=CompressConfig(ranks=ranks, method="auto"))
    reference = {layer.name: layer for layer in plain.decomposed}
    assert {layer.name for layer in auto.decomposed} == set(reference)
    for layer in auto.decomposed:
        ref = reference[layer.name]
        assert layer.rel_reconstruction_error <= ref.rel_reconstruction_error + 1e-9
        assert layer.macs_after <= ref.macs_after
        assert layer.candidates[0]["method"] == "tucker2" and layer.candidates[0]["macs"] == ref.macs_after
    assert auto.totals.conv_macs_after < plain.totals.conv_macs_after
    assert {layer.method for layer in auto.decomposed} - {"tucker2"}  # some layer is cheaper as another method


@pytest.mark.parametrize("method", ["tucker2", "tucker3", "cp3"])
def test_error_policy_meets_the_target_on_every_decomposed_layer(method):
    config = CompressConfig(ranks=RankConfig(policy="error", target_error=0.45), method=method)
    model, report = compress(MODELS / "fashion_cnn.onnx", config=config)
    for layer in report.layers:
        if layer.status == "decomposed":
            assert layer.rel_reconstruction_error <= 0.45
            assert all(m["note"].startswith("cheapest chain with relative error <= 0.45") for m in layer.modes)
        else:
            assert "relative error <= 0.45" in layer.reason or "--min-reduction" in layer.reason
    if method == "tucker2":
        assert len(report.decomposed) >= 4
    onnx.checker.check_model(model, full_check=True)


def test_auto_with_a_rank_file_entry_without_a_method_is_a_usage_error(tmp_path):
    from onnxfactor.errors import UsageError

    (tmp_path / "r.json").write_text(json.dumps({"/2/Conv": [8, 8]}))
    with pytest.raises(UsageError, match="must name its method"):
        compress(MODELS / "fashion_cnn.onnx", config=CompressConfig(ranks=RankConfig(policy="file", rank_file=tmp_path / "r.json"), method="auto"))


MIXED_ENTRIES = {"/2/Conv": ("tucker2", {"out": 12, "in": 10}), "/5/Conv": ("cp3", {"rank": 40}),
                 "/7/Conv": ("tucker3", {"out": 24, "in": 20, "spatial": 6}), "/10/Conv": ("cp4", {"rank": 60})}


@pytest.mark.parametrize("base_method", ["tucker2", "auto"])
def test_a_rank_file_mixing_methods_builds_each_layer_as_its_method_alone_would(tmp_path, base_method):
    """Per-layer methods (what the search's allocation over several methods writes): each layer's chain,
    ranks and error equal the single-method run's for that layer, and the model runs in ONNX Runtime."""
    path = MODELS / "fashion_cnn.onnx"
    (tmp_path / "mixed.json").write_text(json.dumps({n: {"method": m, **r} for n, (m, r) in MIXED_ENTRIES.items()}))
    config = CompressConfig(ranks=RankConfig(policy="file", rank_file=tmp_path / "mixed.json"), method=base_method, min_reduction=None)
    mixed, report = compress(path, config=config)
    rows = {l.name: l for l in report.layers}
    assert {n for n, l in rows.items() if l.status == "decomposed"} == set(MIXED_ENTRIES)
    def convs(model):
        return sum(n.op_type == "Conv" for n in model.graph.node)

    original = onnx.load(str(path))
    mixed_inits = {t.name: t for t in mixed.graph.initializer}
    added = 0
    for name, (method, ranks) in MIXED_ENTRIES.items():
        (tmp_path / f"{method}.json").write_text(json.dumps({name: ranks}))
        alone_model, alone = compress(path, config=CompressConfig(ranks=RankConfig(policy="file", rank_file=tmp_path / f"{method}.json"),
                                                                  method=method, min_reduction=None))
        one = next(l for l in alone.layers if l.name == name)
        assert (rows[name].method, rows[name].ranks) == (one.method, one.ranks) == (method, ranks)
        assert rows[name].rel_reconstruction_error == pytest.approx(one.rel_reconstruction_error, rel=1e-6)
        added += convs(alone_model) - convs(original)
        new = {t.name: t for t in alone_model.graph.initializer if t.name not in {i.name for i in original.graph.initializer}}
        assert new and all(mixed_inits[n].SerializeToString() == t.SerializeToString() for n, t in new.items())  # the same factors
    assert convs(mixed) == convs(original) + added  # each layer's chain, as long as its method makes it
    x = np.load(MODELS / "fashion_mnist_test.npz")["input"][:8]
    assert np.isfinite(run_ort(mixed, {"input": x})[0]).all()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_nudenet_with_every_method(method, tmp_path):
    """The real YOLOv8n detector (64 Conv) with each method at weakened VBMF ranks: checker, ORT run, errors."""
    from onnxfactor.pipeline import check_written_model

    path = model_zoo.nudenet_320n()
    config = CompressConfig(ranks=RankConfig(policy="weakened", weaken=0.6), method=method)
    model, report = compress(path, config=config)
    assert len(report.decomposed) >= 50, [(l.name, l.reason) for l in report.kept]
    for layer in report.decomposed:
        assert layer.method in (method, "svd") or (layer.fallback and layer.method == "tucker2")
        assert 0 <= layer.rel_reconstruction_error < 0.8
    assert sum(1 for layer in report.decomposed if layer.fallback) <= 2
    out = tmp_path / "out.onnx"
    onnx.save(model, str(out))
    check_written_model(out, path)
    x = np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32)
    (expected,), (got,) = run_ort(path, {"images": x}), run_ort(out, {"images": x})
    assert got.shape == expected.shape and np.isfinite(got).all()
    assert rel_l2(expected, got) < 0.5
