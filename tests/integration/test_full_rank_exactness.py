"""Every Conv configuration, decomposed at full rank, reproduces the original in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxfactor import compress
from tests.conftest import full_rank_entry, make_conv_model, rel_l2, run_ort

# (id, kwargs for make_conv_model)
CASES = [
    ("k1", dict(kernel=(1, 1))),
    ("k1_wide", dict(c_in=16, c_out=6, kernel=(1, 1))),
    ("k3", dict(kernel=(3, 3))),
    ("k5_pad2", dict(kernel=(5, 5), pads=(2, 2, 2, 2))),
    ("k7_stride2_pad3", dict(kernel=(7, 7), strides=(2, 2), pads=(3, 3, 3, 3), spatial=(23, 19))),
    ("k1x3", dict(kernel=(1, 3), pads=(0, 1, 0, 1))),
    ("k3x1", dict(kernel=(3, 1), pads=(1, 0, 1, 0))),
    ("per_axis_strides", dict(kernel=(3, 3), strides=(2, 1), pads=(1, 1, 1, 1))),
    ("asym_pads", dict(kernel=(3, 3), pads=(0, 1, 2, 0))),
    ("asym_pads_strided", dict(kernel=(3, 3), strides=(2, 3), pads=(1, 0, 0, 2))),
    ("dilation", dict(kernel=(3, 3), dilations=(2, 2), pads=(2, 2, 2, 2))),
    ("per_axis_dilation", dict(kernel=(3, 3), dilations=(2, 1), pads=(2, 1, 2, 1))),
    ("same_upper", dict(kernel=(3, 3), auto_pad="SAME_UPPER", strides=(2, 2))),
    ("same_lower", dict(kernel=(4, 4), auto_pad="SAME_LOWER", strides=(2, 2))),
    ("valid", dict(kernel=(3, 3), auto_pad="VALID")),
    ("notset", dict(kernel=(3, 3), auto_pad="NOTSET", pads=(1, 1, 1, 1))),
    ("k1_strided_padded", dict(kernel=(1, 1), strides=(2, 2), pads=(1, 0, 0, 1))),
    ("k1_same_upper_strided", dict(kernel=(1, 1), auto_pad="SAME_UPPER", strides=(2, 2))),
    ("group2", dict(c_in=8, c_out=12, kernel=(3, 3), group=2, pads=(1, 1, 1, 1))),
    ("group4_strided", dict(c_in=16, c_out=8, kernel=(3, 3), group=4, strides=(2, 2))),
    ("group2_k1", dict(c_in=8, c_out=12, kernel=(1, 1), group=2)),
    ("no_bias", dict(kernel=(3, 3), bias=False)),
    ("no_bias_k1", dict(kernel=(1, 1), bias=False)),
    ("batch3", dict(kernel=(3, 3), batch=3, pads=(1, 1, 1, 1))),
    ("tall_first_conv", dict(c_in=3, c_out=16, kernel=(3, 3), pads=(1, 1, 1, 1))),
    ("conv1d", dict(kernel=(5,), spatial=(40,), pads=(2, 1))),
    ("conv1d_strided_dilated", dict(kernel=(3,), spatial=(40,), strides=(2,), dilations=(3,))),
    ("conv1d_group2", dict(c_in=8, c_out=8, kernel=(3,), spatial=(30,), group=2)),
    ("conv1d_k1", dict(kernel=(1,), spatial=(30,))),
    ("conv3d", dict(kernel=(3, 3, 3), spatial=(7, 8, 9), pads=(1, 1, 1, 1, 1, 1))),
    ("conv3d_strided_asym", dict(kernel=(3, 1, 3), spatial=(9, 8, 7), strides=(2, 1, 2), pads=(1, 0, 0, 0, 0, 1))),
    ("conv3d_group2", dict(c_in=8, c_out=4, kernel=(2, 2, 2), spatial=(6, 6, 6), group=2)),
]


@pytest.mark.parametrize("kwargs", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_full_rank_chain_matches_original(kwargs, full_rank_config):
    model = make_conv_model(**kwargs)
    weight_shape = tuple(model.graph.initializer[0].dims)
    config = full_rank_config({"conv": full_rank_entry(weight_shape, kwargs.get("group", 1))})
    compressed, report = compress(model, config=config)

    assert [layer.status for layer in report.layers] == ["decomposed"]
    n_convs = sum(n.op_type == "Conv" for n in compressed.graph.node)
    assert n_convs == len(report.layers[0].new_nodes) >= 2
    assert report.layers[0].rel_reconstruction_error < 1e-5
    onnx.checker.check_model(compressed, full_check=True)
    x = np.random.default_rng(1).standard_normal([d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim])
    feeds = {"x": x.astype(np.float32)}
    (expected,), (got,) = run_ort(model, feeds), run_ort(compressed, feeds)
    assert got.shape == expected.shape
    assert rel_l2(expected, got) <= 1e-4


def test_fp16_weights_are_written_back_in_fp16(full_rank_config):
    model = make_conv_model(dtype=np.float16, pads=(1, 1, 1, 1))
    config = full_rank_config({"conv": {"out": 12, "in": 8}})
    compressed, report = compress(model, config=config)
    assert report.layers[0].status == "decomposed"
    assert {init.data_type for init in compressed.graph.initializer} == {10}  # FLOAT16
    x = np.random.default_rng(1).standard_normal((1, 8, 11, 13)).astype(np.float16)
    (expected,), (got,) = run_ort(model, {"x": x}), run_ort(compressed, {"x": x})
    assert got.dtype == np.float16
    # fp16 arithmetic in a 3-conv chain: a few fp16 ulps of relative error
    assert rel_l2(expected, got) <= 3e-3


def test_depthwise_conv_is_skipped_with_reason():
    """A model whose only Conv is depthwise has nothing to compress: exit code 5, with the reason."""
    from onnxfactor.config import CompressConfig
    from onnxfactor.errors import NothingToCompress

    model = make_conv_model(c_in=8, c_out=8, group=8)
    with pytest.raises(NothingToCompress, match="depthwise conv"):
        compress(model, config=CompressConfig())
