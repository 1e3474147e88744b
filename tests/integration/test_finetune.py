"""Fine-tuning through PyTorch: the converter, write-back by name, distillation, fallback, CLI."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfactor import CompressConfig, RankConfig, compress
from onnxfactor.config import CalibrationConfig, FinetuneConfig
from onnxfactor.errors import UsageError
from tests.conftest import MODELS, rel_l2, run_ort
from tests.integration.test_cli import assert_user_error, cli

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from onnxfactor.finetune.graph import check_against_ort, convert  # noqa: E402
from onnxfactor.finetune.stage import chain_tensors, finetune_model  # noqa: E402
from onnxfactor.finetune.writeback import write_back  # noqa: E402

CALIB = MODELS / "fashion_mnist_calib.npz"
TEST = MODELS / "fashion_mnist_test.npz"
STEPS = FinetuneConfig(steps=1, threads=1, batch_size=32)


def _compressed(name="fashion_cnn", ratio=0.3) -> onnx.ModelProto:
    config = CompressConfig(ranks=RankConfig(policy="ratio", ratio=ratio), exclude=("/0/Conv",))
    return compress(MODELS / f"{name}.onnx", config=config).model


def _initializers(model):
    return {t.name: t.SerializeToString() for t in model.graph.initializer}


def _structure(model):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.initializer[:]
    return copy.SerializeToString()


def test_round_trip_without_training_is_byte_identical():
    model = _compressed()
    before = model.SerializeToString()
    trainable, _ = chain_tensors(model)
    module = convert(model, trainable)
    assert len(trainable) == 20  # 5 chains: the in, core and out weights and the bias of each
    write_back(model, module.trained())
    assert model.SerializeToString() == before


@pytest.mark.parametrize("kernel,method,nodes", [((1, 1), "tucker2", 2), ((3, 3), "tucker2", 3), ((3, 3), "cp3", 3),
                                                  ((3, 3), "cp4", 4), ((3, 3), "tucker3", 4)])
def test_every_chain_the_rewrite_makes_is_trainable(kernel, method, nodes):
    """Every method's chain nodes are recognised (the SVD of a 1x1 conv, ``svd_svd_a`` / ``svd_svd_b``,
    was not): all of a one-Conv model's initializers train and its output is the feature."""
    from tests.conftest import make_conv_model

    config = CompressConfig(method=method, ranks=RankConfig(policy="ratio", ratio=0.5), min_reduction=None)
    model = compress(make_conv_model(16, 16, kernel, (9, 9)), config=config).model
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == nodes
    trainable, features = chain_tensors(model)
    assert trainable == {t.name for t in model.graph.initializer} and features == ["y"]


def test_one_training_step_changes_only_the_trainable_initializers():
    model = _compressed()
    teacher = onnx.load(str(MODELS / "fashion_cnn.onnx"))
    before, structure = _initializers(model), _structure(model)
    trainable, features = chain_tensors(model)
    report = finetune_model(model, teacher, CALIB, STEPS, samples=64)
    after = _initializers(model)
    assert report["steps"] == 1 and report["trained_initializers"] == len(trainable) and report["features"] == len(features) == 5
    assert {n for n in before if before[n] != after[n]} == trainable
    assert _structure(model) == structure  # nodes, names, opset, IR version, metadata
    # the written model computes what torch's forward computes with the trained values
    assert check_against_ort(convert(model, set()), model, [{"input": np.load(TEST)["input"][:16]}]) <= 1e-4


def _held_out_error(model) -> float:
    x = np.load(TEST)["input"][:200]
    return rel_l2(run_ort(MODELS / "fashion_cnn.onnx", {"input": x})[0], run_ort(model, {"input": x})[0])


@pytest.mark.parametrize("labels", [False, True])
def test_distillation_lowers_the_held_out_output_error(labels):
    """fashion_cnn at 30 % of the full ranks, weight-only fit: logits' relative L2 error on 200
    held-out test images 0.672 before; after 30 steps on 960 calibration (train) images, measured
    0.265 without labels and 0.278 with cross-entropy on them."""
    model = _compressed()
    before = _held_out_error(model)
    config = FinetuneConfig(steps=30, threads=1, label_weight=1.0 if labels else 0.0)
    report = finetune_model(model, onnx.load(str(MODELS / "fashion_cnn.onnx")), CALIB, config, samples=960)
    after = _held_out_error(model)
    assert report["loss_last"] < report["loss_first"]
    assert before > 0.6 and after < before - 0.3
    assert report["per_epoch"][0]["seconds"] > 0 and report["peak_rss_mb"] > 0


def _shared_weight_model() -> onnx.ModelProto:
    """x -> conv_a(w) -> Relu -> conv_b(w) -> y: one weight, two Convs."""
    rng = np.random.default_rng(0)
    u, v = np.linalg.qr(rng.standard_normal((16, 4)))[0], np.linalg.qr(rng.standard_normal((16, 4)))[0]
    w = np.einsum("abhw,oa,ib->oihw", rng.standard_normal((4, 4, 3, 3)), u, v)
    w = (w + 0.05 * rng.standard_normal(w.shape)).astype(np.float32)  # not exactly rank 4: there is something to learn
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="conv_a", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w"], ["y"], name="conv_b", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16, 8, 8])],
                              initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_shared_weights_stay_tied():
    original = _shared_weight_model()
    model = compress(original, config=CompressConfig(ranks=RankConfig(policy="ratio", ratio=0.25), min_reduction=None)).model
    shared = {n.name: n.SerializeToString() for n in model.graph.initializer if sum(n.name in node.input for node in model.graph.node) == 2}
    assert len(shared) == 3  # the factors of the one weight, used by both chains
    data = [{"x": np.random.default_rng(i).standard_normal((4, 16, 8, 8)).astype(np.float32)} for i in range(4)]
    report = finetune_model(model, original, data, FinetuneConfig(steps=3, threads=1))
    assert report["applied"] and report["held_out_loss_after"] < report["held_out_loss_before"]
    after = {n.name: n.SerializeToString() for n in model.graph.initializer if sum(n.name in node.input for node in model.graph.node) == 2}
    assert list(after) == list(shared) and len(model.graph.initializer) == len(model.graph.initializer)
    assert all(after[n] != shared[n] for n in shared)  # trained, and still one tensor each for both Convs


def test_fine_tuning_that_does_not_lower_the_held_out_loss_is_not_applied():
    """An exact chain (a rank-4 weight at rank 4) can only get worse: the held-out first batch says
    so, and the starting weights are written back byte for byte."""
    from tests.conftest import make_conv_model

    rng = np.random.default_rng(0)
    u, v = np.linalg.qr(rng.standard_normal((16, 4)))[0], np.linalg.qr(rng.standard_normal((16, 4)))[0]
    w = np.einsum("abhw,oa,ib->oihw", rng.standard_normal((4, 4, 3, 3)), u, v).astype(np.float32)
    original = make_conv_model(16, 16, (3, 3), (8, 8), pads=[1, 1, 1, 1], weight=w)
    model = compress(original, config=CompressConfig(ranks=RankConfig(policy="ratio", ratio=0.25), min_reduction=None)).model
    before = _initializers(model)
    data = [{"x": np.random.default_rng(i).standard_normal((1, 16, 8, 8)).astype(np.float32)} for i in range(4)]
    report = finetune_model(model, original, data, FinetuneConfig(steps=3, threads=1, lr=1e-2, batch_size=4))
    assert report["held_out_loss_before"] < 1e-9 < report["held_out_loss_after"] and report["applied"] is False
    assert report["steps"] == 3 and report["epochs"] == 1.0  # 3 training batches: the first of 4 is held out
    assert "fixed batch dimension" in report["batch_note"]  # x: [1, 16, 8, 8] runs one sample per step
    assert _initializers(model) == before


def test_an_op_the_converter_lacks_falls_back_to_layer_wise_reconstruction():
    base = onnx.load(str(MODELS / "fashion_cnn.onnx"))
    logits = base.graph.output[0].name
    base.graph.node.append(helper.make_node("LpNormalization", [logits], ["normed"], axis=1, p=2))
    base.graph.output.append(helper.make_tensor_value_info("normed", TensorProto.FLOAT, ["batch", 10]))
    config = CompressConfig(ranks=RankConfig(policy="ratio", ratio=0.3), exclude=("/0/Conv",), calibration=CalibrationConfig(samples=64))
    _, report = compress(base, config=config, calibration=CALIB, finetune=FinetuneConfig(steps=2))
    assert "LpNormalization" in report.finetune["fallback"] and "layer-wise reconstruction" in report.finetune["fallback"]
    assert all(l.reconstruction and l.reconstruction["steps"] == 300 for l in report.decomposed)


def test_finetune_command_on_an_op_the_converter_lacks_is_exit_5_naming_it(tmp_path):
    """``onnxfactor finetune`` has no chains to reconstruct from: one line naming the op and the
    command that works (ddddocr's LSTM OCR model crashed with exit 1 before), and no file."""
    base = onnx.load(str(MODELS / "fashion_cnn.onnx"))
    logits = base.graph.output[0].name
    base.graph.node.append(helper.make_node("LpNormalization", [logits], ["normed"], axis=1, p=2))
    base.graph.output.append(helper.make_tensor_value_info("normed", TensorProto.FLOAT, ["batch", 10]))
    onnx.save(base, tmp_path / "orig.onnx")
    config = CompressConfig(ranks=RankConfig(policy="ratio", ratio=0.3), exclude=("/0/Conv",))
    onnx.save(compress(base, config=config).model, tmp_path / "small.onnx")
    proc = cli("finetune", "small.onnx", "tuned.onnx", "--teacher", "orig.onnx", "--calibration", CALIB, "--steps", "1", cwd=tmp_path)
    assert_user_error(proc, 5, "LpNormalization", "--reconstruct 300", "small.onnx")
    assert not (tmp_path / "tuned.onnx").exists()


def test_compress_with_finetune_reports_it(tmp_path):
    config = CompressConfig(ranks=RankConfig(policy="ratio", ratio=0.3), exclude=("/0/Conv",), calibration=CalibrationConfig(samples=128))
    model, report = compress(MODELS / "fashion_cnn.onnx", config=config, calibration=CALIB, finetune=FinetuneConfig(steps=4, threads=1))
    assert report.finetune["steps"] == 4 and report.finetune["reproduction_error"] < 1e-4
    assert report.finetune["data"] == "fashion_mnist_calib.npz (128 samples)"
    onnx.checker.check_model(model, full_check=True)


def test_compress_with_finetune_when_no_layer_is_decomposed_skips_it():
    """Full ranks save nothing (--min-reduction keeps every Conv): nothing to train, said, not raised
    (a search candidate of one layer whose chain is not worth it used to crash the search)."""
    config = CompressConfig(ranks=RankConfig(policy="ratio", ratio=1.0), calibration=CalibrationConfig(samples=32))
    model, report = compress(MODELS / "fashion_cnn.onnx", config=config, calibration=CALIB, finetune=FinetuneConfig(steps=2, threads=1))
    assert not report.decomposed
    assert report.finetune["skipped"] == "fine-tuning skipped: no layer was decomposed, so --train factors has nothing to train"


def test_finetune_without_torch_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(UsageError, match=r"pip install 'onnxfactor\[finetune\]'"):
        compress(MODELS / "fashion_cnn.onnx", calibration=CALIB, finetune=FinetuneConfig(steps=1))


def test_cli_finetune_command(tmp_path):
    compressed = tmp_path / "c.onnx"
    onnx.save(_compressed(), compressed)
    np.savez(tmp_path / "calib.npz", input=np.load(CALIB)["input"][:128])
    np.savez(tmp_path / "test.npz", **{k: v[:128] for k, v in np.load(TEST).items()})
    proc = cli("finetune", "c.onnx", "ft.onnx", "--teacher", MODELS / "fashion_cnn.onnx", "--calibration", "calib.npz",
               "--data", "test.npz", "--steps", "3", "--report", "r.json", "--latency-runs", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["finetune"]["steps"] == 3 and report["validation"]["samples"] == 128
    assert "fine-tuned 20 tensors" in proc.stdout
    onnx.checker.check_model(str(tmp_path / "ft.onnx"), full_check=True)
    # mismatched teacher, bad device, bad --train, overlap, no data: one line, exit 2
    assert_user_error(cli("finetune", "c.onnx", "x.onnx", "--teacher", MODELS / "fashion_vgg_wide.onnx", "--calibration", "calib.npz",
                          cwd=tmp_path), 2, "--teacher")
    if not torch.cuda.is_available():
        assert_user_error(cli("finetune", "c.onnx", "x.onnx", "--teacher", MODELS / "fashion_cnn.onnx", "--calibration", "calib.npz",
                              "--device", "cuda", cwd=tmp_path), 2, "cuda")
    assert cli("finetune", "c.onnx", "x.onnx", "--teacher", MODELS / "fashion_cnn.onnx", "--calibration", "calib.npz",
               "--train", "half", cwd=tmp_path).returncode == 2
    assert_user_error(cli("finetune", "c.onnx", "x.onnx", "--teacher", MODELS / "fashion_cnn.onnx", "--calibration", "test.npz",
                          "--data", "test.npz", cwd=tmp_path), 2, "--allow-overlap")
    assert_user_error(cli("finetune", "c.onnx", "x.onnx", "--teacher", MODELS / "fashion_cnn.onnx", cwd=tmp_path), 2, "--calibration")
    assert not (tmp_path / "x.onnx").exists()


def test_iterative_mode_re_estimates_the_next_stages_ranks_on_updated_weights(tmp_path):
    """VBMF ranks depend on the weights alone: stage 2's differ from one shot only because the
    Convs waiting for their stage were trained during stage 1."""
    from onnxfactor.pipeline import compress_file
    from onnxfactor.validation.run import ValidationOptions

    config = CompressConfig(exclude=("/0/Conv",), calibration=CalibrationConfig(samples=256))
    one_shot = {l.name: l.ranks for l in compress(MODELS / "fashion_cnn.onnx", config=config, calibration=CALIB).report.layers}
    seen = []
    report = compress_file(MODELS / "fashion_cnn.onnx", tmp_path / "it.onnx", config=config, calibration=CALIB,
                           validation=ValidationOptions(data=TEST, max_samples=300, latency_runs=0),
                           finetune=FinetuneConfig(steps=20, threads=1, stage_size=2), report_path=tmp_path / "r.json",
                           progress=lambda d, n, text: seen.append(text))
    stages = report.finetune["stages"]
    assert [s["nodes"] for s in stages] == [["/2/Conv", "/5/Conv"], ["/7/Conv", "/10/Conv"], ["/12/Conv"]]
    assert stages[0]["ranks"] == {n: one_shot[n] for n in stages[0]["nodes"]}  # stage 1: the original weights
    later = {n: r for s in stages[1:] for n, r in s["ranks"].items()}
    assert sum(later[n] != one_shot[n] for n in later) >= 2  # measured: all 3 differ (e.g. /7/Conv 31x29 -> 32x32)
    assert all(s["finetune"]["steps"] == 20 for s in stages)
    ratios = [s["conv_macs_ratio_so_far"] for s in stages]
    assert ratios == sorted(ratios) and ratios[-1] == pytest.approx(report.totals.conv_macs_ratio)
    # measured 0.968 on these 300 held-out images after every stage
    assert all(s["held_out"]["top1_agreement"] >= 0.93 for s in stages)
    assert any("stage 2/3 done" in t and "held-out agreement" in t for t in seen)
    assert report.validation["samples"] == 300 and len(report.decomposed) == 5
    assert json.loads((tmp_path / "r.json").read_text())["finetune"]["stages"][2]["nodes"] == ["/12/Conv"]
    onnx.checker.check_model(str(tmp_path / "it.onnx"), full_check=True)


def test_cli_iterative_needs_finetune(tmp_path):
    assert_user_error(cli("compress", MODELS / "fashion_cnn.onnx", "x.onnx", "--calibration", CALIB, "--iterative", cwd=tmp_path),
                      2, "--finetune")
    assert not (tmp_path / "x.onnx").exists()


def test_iterative_mode_with_include_linear_stages_the_fc_layers_in_graph_order(tmp_path):
    """``--iterative --include-linear``: the Gemm layers join the Convs' stages in graph order, are
    decomposed when their stage comes and train while they wait."""
    config = CompressConfig(exclude=("/0/Conv",), include_linear=True, calibration=CalibrationConfig(samples=128))
    result = compress(MODELS / "fashion_cnn.onnx", config=config, calibration=CALIB,
                      finetune=FinetuneConfig(steps=3, threads=1, stage_size=3))
    stages = result.report.finetune["stages"]
    assert [s["nodes"] for s in stages] == [["/2/Conv", "/5/Conv", "/7/Conv"], ["/10/Conv", "/12/Conv", "/16/Gemm"], ["/18/Gemm"]]
    assert stages[0]["finetune"]["trained_initializers"] > 0
    rows = {l.name: l for l in result.report.layers}
    assert rows["/16/Gemm"].is_linear and rows["/16/Gemm"].status == "decomposed"
    assert stages[1]["ranks"]["/16/Gemm"] == rows["/16/Gemm"].ranks
    totals = result.report.totals
    assert totals.linear_params_after < totals.linear_params_before and totals.conv_macs_ratio > 2
    onnx.checker.check_model(result.model, full_check=True)
    x = np.load(TEST)["input"][:16]
    assert np.isfinite(run_ort(result.model, {"input": x})[0]).all()
