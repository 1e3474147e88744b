"""``onnxfactor compress / analyze --calibration`` on the bundled model, as subprocesses."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from tests.conftest import MODELS
from tests.integration.test_cli import assert_no_traceback, assert_user_error, cli, listing, sha256

ort = pytest.importorskip("onnxruntime")


@pytest.fixture
def work(tmp_path):
    for name in ("fashion_cnn.onnx", "fashion_mnist_calib.npz", "fashion_mnist_test.npz"):
        shutil.copy(MODELS / name, tmp_path / name)
    # 200 calibration and 200 validation samples keep the runs short
    calib = np.load(tmp_path / "fashion_mnist_calib.npz")
    np.savez(tmp_path / "calib.npz", input=calib["input"][:200])
    test = np.load(tmp_path / "fashion_mnist_test.npz")
    np.savez(tmp_path / "test.npz", input=test["input"][:200], labels=test["labels"][:200])
    return tmp_path


def test_correction_passes_group_the_layers(work):
    proc = cli("compress", "fashion_cnn.onnx", "out.onnx", "--ranks", "ratio", "--ratio", "0.3", "--exclude", "/0/Conv",
               "--calibration", "calib.npz", "--calibration-samples", "64", "--correction-passes", "2", "--no-measure",
               "--no-validate", "--report", "r.json", cwd=work)
    assert proc.returncode == 0, proc.stderr
    correction = json.loads((work / "r.json").read_text())["calibration"]["correction"]
    assert correction["stages"] == 2 and correction["layers"] == 5


def test_compress_with_calibration_reports_fit_errors_and_correction(work):
    before = sha256(work / "fashion_cnn.onnx")
    proc = cli("compress", "fashion_cnn.onnx", "out.onnx", "--ranks", "ratio", "--ratio", "0.3", "--exclude", "/0/Conv",
               "--calibration", "calib.npz", "--data", "test.npz", "--no-measure", "--report", "r.json", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert_no_traceback(proc)
    assert sha256(work / "fashion_cnn.onnx") == before
    report = json.loads((work / "r.json").read_text())
    assert report["calibration"]["samples"] == 200 and report["calibration"]["fit"] == "data"
    assert report["calibration"]["correction"]["stages"] == 5
    decomposed = [l for l in report["layers"] if l["status"] == "decomposed"]
    assert len(decomposed) == 5
    assert all(l["fit"] == "data" and l["output_error"] > 0 and "error_after" in l["correction"] for l in decomposed)
    assert "fit" in proc.stdout and "out. err" in proc.stdout and "calibration: calib.npz (200 samples)" in proc.stdout
    onnx.checker.check_model(str(work / "out.onnx"), full_check=True)
    # accuracy on held-out test images, with the report's own figure
    assert report["validation"]["accuracy_compressed"] > 0.8


def test_compress_refuses_calibration_and_validation_on_the_same_samples(work):
    np.savez(work / "overlap.npz", input=np.load(work / "test.npz")["input"][50:60])
    for data in ("calib.npz", "overlap.npz"):
        args = ["--data", "test.npz"] if data == "overlap.npz" else ["--data", data]
        proc = cli("compress", "fashion_cnn.onnx", "out.onnx", "--calibration", data, *args, "--no-measure", cwd=work)
        line = assert_user_error(proc, 2, "--allow-overlap")
        assert "share" in line
        assert "out.onnx" not in listing(work)
    proc = cli("compress", "fashion_cnn.onnx", "out.onnx", "--calibration", "overlap.npz", "--data", "test.npz",
               "--allow-overlap", "--no-measure", "--no-correct", "--fit", "weights", "--report", "r.json", cwd=work)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((work / "r.json").read_text())
    assert {l["fit"] for l in report["layers"] if l["status"] == "decomposed"} == {"weights"}
    assert all(l["correction"] is None for l in report["layers"])


def test_bad_calibration_data_is_a_one_line_usage_error(work):
    x = np.load(work / "calib.npz")["input"].copy()
    x[17, 0, 3, 3] = np.inf
    np.savez(work / "inf.npz", input=x)
    proc = cli("compress", "fashion_cnn.onnx", "out.onnx", "--calibration", "inf.npz", "--no-measure", cwd=work)
    assert_user_error(proc, 2, "inf.npz", "sample 17")
    proc = cli("compress", "fashion_cnn.onnx", "out.onnx", "--calibration", "missing.npz", "--no-measure", cwd=work)
    assert_user_error(proc, 2, "missing.npz", "--calibration")
    assert "out.onnx" not in listing(work)


def test_analyze_with_calibration_shows_data_aware_ranks(work):
    proc = cli("analyze", "fashion_cnn.onnx", "--calibration", "calib.npz", "--calibration-samples", "100", "--report", "a.json", cwd=work)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((work / "a.json").read_text())
    assert report["calibration"]["samples"] == 100
    rows = [l for l in report["layers"] if l["status"] == "would decompose"]
    assert rows and all(l["fit"] == "data" and l["output_error"] is not None for l in rows)
    assert "out. err" in proc.stdout
