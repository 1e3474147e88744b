"""The onnx wheel's pytorch-converted test_Conv* cases, compressed at full rank, reproduce their
expected outputs (and depthwise / ConvTranspose cases are reported as not decomposed)."""

from __future__ import annotations

import json

import onnx
import pytest
from onnx import numpy_helper

from onnxfactor import analyze, compress
from onnxfactor.config import CompressConfig, RankConfig
from tests.conftest import full_rank_entry, rel_l2, run_ort
from tools import model_zoo

CASES = model_zoo.conv_test_cases()


def _load_pb(path):
    t = onnx.TensorProto()
    t.ParseFromString(path.read_bytes())
    return numpy_helper.to_array(t)


def test_conv_cases_are_found():
    # onnx 1.16-1.23 ship 26 Conv{1,2,3}d cases and 2 ConvTranspose2d cases
    assert sum("ConvTranspose" not in c.name for c in CASES) >= 26


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_conv_case_full_rank(case, tmp_path):
    model_path = case / "model.onnx"
    if "depthwise" in case.name or "ConvTranspose" in case.name:  # no candidate: nothing to compress, with the reason
        from onnxfactor.errors import NothingToCompress

        with pytest.raises(NothingToCompress, match="depthwise conv|ConvTranspose is not decomposed"):
            analyze(model_path)
        return
    layers = analyze(model_path).layers
    entries = {layer.name: full_rank_entry(layer.weight_shape, layer.group) for layer in layers}
    rank_file = tmp_path / "ranks.json"
    rank_file.write_text(json.dumps(entries))
    config = CompressConfig(ranks=RankConfig(policy="file", rank_file=rank_file), min_reduction=None, in_mode_min_channels=0)
    compressed, report = compress(model_path, config=config)

    onnx.checker.check_model(compressed, full_check=True)
    original = onnx.load(str(model_path))
    feed_name = [i.name for i in original.graph.input if i.name not in {t.name for t in original.graph.initializer}][0]
    data = case / "test_data_set_0"
    x = _load_pb(data / "input_0.pb")
    expected = _load_pb(data / "output_0.pb")
    (got,) = run_ort(compressed, {feed_name: x})
    assert got.shape == expected.shape
    assert rel_l2(expected, got) <= 1e-4
    assert len(report.decomposed) == 1
    assert sum(n.op_type == "Conv" for n in compressed.graph.node) == len(report.decomposed[0].new_nodes)
