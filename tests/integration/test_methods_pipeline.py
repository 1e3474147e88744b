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
from onnxfactor.pipeline import ValidationOptions
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


@pytest.mark.parametrize("method", ["cp3", "tucker3"])
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
