"""CP-3, CP-4 and spatial-Tucker chains of exact low-rank weights reproduce the original Conv in
ONNX Runtime, for every geometry: strides, asymmetric pads, dilations, auto_pad, groups, bias,
1-D / 2-D / 3-D.

rewrite.py does not call :func:`~onnxfactor.methods.base.geometry_attrs` yet, so the chain is
turned into ONNX here (:func:`chain_model`), with exactly the attributes the rewrite will use.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxfactor.methods import cp, tucker3
from onnxfactor.methods.base import ChainSpec, ConvGeometry, geometry_attrs
from tests.conftest import make_conv_model, rel_l2, run_ort
from tests.unit.test_cp import exact_cp3, exact_cp4, spatial_tucker

O, I, RANK = 8, 6, 4  # channels per group, CP rank
TUCKER_RANKS = (5, 3, 2)


def chain_model(original: onnx.ModelProto, chain: ChainSpec) -> onnx.ModelProto:
    """The original one-Conv model with its Conv replaced by ``chain`` (as rewrite.py will do)."""
    node = original.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    bias = node.input[2] if len(node.input) > 2 else None
    nodes, inits, x = [], [i for i in original.graph.initializer if i.name != "w"], "x"
    for index, conv in enumerate(chain.convs):
        name = f"{chain.method}_{conv.role}"
        inits.append(numpy_helper.from_array(conv.weight.astype(np.float32), f"{name}_w"))
        conv_attrs = geometry_attrs(conv, attrs)
        conv_attrs["kernel_shape"] = list(conv.weight.shape[2:])
        conv_attrs["group"] = conv.group
        inputs = [x, f"{name}_w"] + ([bias] if conv.takes_bias and bias else [])
        out = "y" if index == len(chain.convs) - 1 else f"{name}_out"
        nodes.append(helper.make_node("Conv", inputs, [out], name=name, **conv_attrs))
        x = out
    graph = helper.make_graph(nodes, "chain", list(original.graph.input), list(original.graph.output), initializer=inits)
    model = helper.make_model(graph, opset_imports=list(original.opset_import))
    model.ir_version = original.ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def build_weight(method: str, kernel, group: int, rng) -> np.ndarray:
    if method == "cp3":
        return exact_cp3(rng, O, I, kernel, RANK, group)
    if method == "cp4":
        return exact_cp4(rng, O, I, kernel, RANK, group)
    ranks = (TUCKER_RANKS[0], TUCKER_RANKS[1], min(TUCKER_RANKS[2], math.prod(kernel)))
    return np.concatenate([spatial_tucker(rng, O, I, kernel, ranks) for _ in range(group)], axis=0)


def decompose(method: str, weight: np.ndarray, geometry: ConvGeometry) -> ChainSpec:
    if method == "tucker3":
        ranks = dict(zip(("out", "in", "spatial"), TUCKER_RANKS))
        ranks["spatial"] = min(ranks["spatial"], math.prod(geometry.kernel_shape))
        return tucker3.decompose(weight, geometry, ranks)
    return cp.decompose(weight, geometry, {"rank": RANK}, variant=method)


# (id, kernel, spatial, conv attributes, group, bias)
CASES = [
    ("k3", (3, 3), (11, 13), {}, 1, True),
    ("k3_pad1", (3, 3), (11, 13), dict(pads=(1, 1, 1, 1)), 1, True),
    ("k5x3_asym_pads", (5, 3), (12, 11), dict(pads=(0, 1, 2, 0)), 1, True),
    ("k3_strided_asym", (3, 3), (15, 14), dict(strides=(2, 3), pads=(1, 0, 0, 2)), 1, False),
    ("k3_dilated", (3, 3), (13, 12), dict(dilations=(2, 1), pads=(2, 1, 2, 1)), 1, True),
    ("k4_same_upper", (4, 4), (11, 10), dict(auto_pad="SAME_UPPER", strides=(2, 2)), 1, True),
    ("k4_same_lower", (4, 4), (11, 10), dict(auto_pad="SAME_LOWER", strides=(2, 3)), 1, True),
    ("k3_valid", (3, 3), (11, 10), dict(auto_pad="VALID", strides=(1, 2)), 1, True),
    ("k3_notset", (3, 3), (11, 10), dict(auto_pad="NOTSET", pads=(1, 2, 1, 0)), 1, True),
    # (ONNX Runtime rejects dilations with SAME_* auto_pad, for the original conv too)
    ("k3_same_upper_stride1", (3, 3), (12, 11), dict(auto_pad="SAME_UPPER"), 1, True),
    ("k1x3_strided", (1, 3), (10, 11), dict(strides=(2, 1), pads=(0, 1, 0, 1)), 1, True),
    ("group2", (3, 3), (11, 13), dict(pads=(1, 1, 1, 1)), 2, True),
    ("group2_strided_no_bias", (3, 3), (12, 13), dict(strides=(2, 2), pads=(0, 1, 1, 0)), 2, False),
    ("group2_same_lower", (3, 3), (10, 9), dict(auto_pad="SAME_LOWER", strides=(2, 2)), 2, True),
    ("conv1d", (5,), (40,), dict(pads=(2, 1)), 1, True),
    ("conv1d_strided_dilated", (3,), (40,), dict(strides=(2,), dilations=(3,)), 1, False),
    ("conv1d_group2_same", (4,), (30,), dict(auto_pad="SAME_UPPER"), 2, True),
    ("conv3d", (3, 3, 3), (7, 8, 9), dict(pads=(1, 1, 1, 1, 1, 1)), 1, True),
    ("conv3d_strided_asym", (3, 2, 3), (9, 8, 7), dict(strides=(2, 1, 2), pads=(1, 0, 0, 0, 1, 1)), 1, True),
    ("conv3d_same_upper_group2", (2, 3, 2), (6, 7, 6), dict(auto_pad="SAME_UPPER", strides=(1, 2, 2)), 2, False),
]


@pytest.mark.parametrize("method", ["cp3", "cp4", "tucker3"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_chain_matches_original_conv(method, case):
    _, kernel, spatial, attrs, group, bias = case
    rng = np.random.default_rng(zlib.crc32(f"{method}/{case[0]}".encode()))
    weight = build_weight(method, kernel, group, rng).astype(np.float32)
    original = make_conv_model(
        c_in=I * group, c_out=O * group, kernel=kernel, spatial=spatial, group=group, bias=bias, weight=weight, batch=2, **attrs
    )
    node_attrs = {a.name: helper.get_attribute_value(a) for a in original.graph.node[0].attribute}
    chain = decompose(method, weight, ConvGeometry.from_attrs(node_attrs, weight.shape))
    assert chain.rel_error < 1e-5
    if method == "cp4" and sum(k > 1 for k in kernel) > 1:
        assert any(c.axis is not None for c in chain.convs)

    x = rng.standard_normal((2, I * group, *spatial)).astype(np.float32)
    (expected,), (got,) = run_ort(original, {"x": x}), run_ort(chain_model(original, chain), {"x": x})
    assert got.shape == expected.shape
    assert rel_l2(expected, got) <= 1e-4
