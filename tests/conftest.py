"""Shared fixtures: tiny Conv models built with onnx.helper, ONNX Runtime runs, full-rank configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def make_conv_model(
    c_in: int = 8,
    c_out: int = 12,
    kernel=(3, 3),
    spatial=(11, 13),
    *,
    strides=None,
    pads=None,
    dilations=None,
    auto_pad: str | None = None,
    group: int = 1,
    bias: bool = True,
    batch: int = 1,
    dtype=np.float32,
    seed: int = 0,
    weight: np.ndarray | None = None,
    opset: int = 17,
) -> onnx.ModelProto:
    """A model with one Conv node named ``conv`` (input ``x``, output ``y``) and random weights."""
    rng = np.random.default_rng(seed)
    kernel = tuple(kernel)
    if weight is None:
        weight = rng.standard_normal((c_out, c_in // group, *kernel)).astype(dtype)
    attrs = {"kernel_shape": list(kernel), "group": group}
    if strides is not None:
        attrs["strides"] = list(strides)
    if pads is not None:
        attrs["pads"] = list(pads)
    if dilations is not None:
        attrs["dilations"] = list(dilations)
    if auto_pad is not None:
        attrs["auto_pad"] = auto_pad
    inits = [numpy_helper.from_array(weight.astype(dtype), "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(c_out).astype(dtype), "b"))
        inputs.append("b")
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    node = helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", elem, [batch, c_in, *spatial])],
        [helper.make_tensor_value_info("y", elem, [None] * (2 + len(spatial)))],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def run_ort(model: onnx.ModelProto | str | Path, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


def full_rank_entry(weight_shape, group: int) -> dict:
    o, i = weight_shape[0] // group, weight_shape[1]
    if all(k == 1 for k in weight_shape[2:]):
        return {"rank": min(o, i)}
    return {"out": o, "in": i}


@pytest.fixture
def full_rank_config(tmp_path):
    """Build a CompressConfig that decomposes the given nodes at full rank, always."""
    from onnxfactor.config import CompressConfig, RankConfig

    def build(entries: dict) -> CompressConfig:
        path = tmp_path / "full_ranks.json"
        path.write_text(json.dumps(entries))
        return CompressConfig(ranks=RankConfig(policy="file", rank_file=path), min_reduction=None, in_mode_min_channels=0)

    return build
