"""The ``onnxfactor`` command line, run as ``python -m onnxfactor`` subprocesses.

User errors: the documented exit code (``onnxfactor/errors.py``), exactly one non-empty stderr line
starting with ``error:``, no traceback, and nothing written (no output, no ``.*.tmp``) in the
directory the output would go to. Happy paths: the figures in the JSON reports against our own
ONNX Runtime runs of both models on the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import MODELS, rel_l2, run_ort

TIMEOUT = 120
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A real trained model shipped in the repo; its first half is a truncated ONNX file.
REAL_MODEL = MODELS / "fashion_cnn.onnx"
# Tucker-2 structure of the test Conv: VBMF should find exactly these ranks.
RANK_OUT, RANK_IN = 8, 8


def _env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ONNXFACTOR_DEBUG"}
    # Wide, colourless output so tables and help do not wrap or carry escape codes.
    env.update(OPENBLAS_NUM_THREADS="1", COLUMNS="200", NO_COLOR="1")
    env.update(overrides)
    return env


def cli(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "onnxfactor", *map(str, args)],
        cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=TIMEOUT,
    )


def assert_no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr


def assert_user_error(proc: subprocess.CompletedProcess, exit_code: int, *fragments: str) -> str:
    """Exit code, one ``error:`` line on stderr containing every fragment, no traceback; returns the line."""
    assert proc.returncode == exit_code, f"exit {proc.returncode}, stderr:\n{proc.stderr}"
    assert_no_traceback(proc)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got:\n{proc.stderr}"
    assert lines[0].startswith("error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def listing(directory: Path) -> list[str]:
    """Every file and directory below ``directory``, dotfiles (temporary files) included."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Models and data


def tucker_conv_model(seed: int = 0) -> onnx.ModelProto:
    """Conv 32->64 3x3 (``conv1``) + Relu whose weight is Tucker-2 of ranks (8, 8) plus 1 % noise.

    W = core x_out U x_in V + noise, with orthonormal U (64x8), V (32x8): VBMF finds ranks 8/8 and the
    decomposition is lossy only by the noise. Input ``x`` is ``[N, 32, 16, 16]``.
    """
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((64, RANK_OUT)))[0]
    v = np.linalg.qr(rng.standard_normal((32, RANK_IN)))[0]
    core = rng.standard_normal((RANK_OUT, RANK_IN, 3, 3))
    w = np.einsum("oa,ib,abhw->oihw", u, v, core)
    w *= np.sqrt(w.size) / np.linalg.norm(w)
    w = ((w + 0.01 * rng.standard_normal(w.shape)) / np.sqrt(32 * 9)).astype(np.float32)
    b = (0.1 * rng.standard_normal(64)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes, "tucker_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64, 16, 16])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def relu_model() -> onnx.ModelProto:
    """A valid model without any Conv."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """``tiny.onnx`` (the Tucker-structured Conv), ``relu.onnx`` and ``data.npz`` (3 samples of x)."""
    root = tmp_path_factory.mktemp("assets")
    onnx.save(tucker_conv_model(), root / "tiny.onnx")
    onnx.save(relu_model(), root / "relu.onnx")
    x = np.random.default_rng(1).standard_normal((3, 32, 16, 16)).astype(np.float32)
    np.savez(root / "data.npz", x=x)
    return root


@pytest.fixture
def work(tmp_path: Path, assets: Path) -> Path:
    """A fresh working directory holding copies of the assets; commands run with it as cwd."""
    for name in ("tiny.onnx", "relu.onnx", "data.npz"):
        shutil.copy(assets / name, tmp_path / name)
    return tmp_path


def outputs_of(model: Path, x: np.ndarray) -> np.ndarray:
    return run_ort(model, {"x": x})[0]


# --------------------------------------------------------------------------------------------------
# python -m onnxfactor, help


def test_main_module_pins_blas_threads_before_numpy(tmp_path):
    env = _env()
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(var, None)
    code = (
        "import os, sys\n"
        "import onnxfactor\n"
        "assert 'numpy' not in sys.modules, 'import onnxfactor imported numpy'\n"
        "import onnxfactor.__main__\n"
        "print(os.environ['OPENBLAS_NUM_THREADS'], os.environ['OMP_NUM_THREADS'], os.environ['MKL_NUM_THREADS'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "1", "1"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--help"], ["compress", "analyze", "validate", "Exit codes"]),
        (["compress", "--help"], ["INPUT_MODEL", "OUTPUT_MODEL", "--ranks", "--rank-file", "--weaken", "--input-shape",
                                  "--data", "--provider", "--max-rel-error", "--no-validate", "--report", "--quiet"]),
        (["analyze", "--help"], ["--ranks", "--rank-file", "--input-shape", "--report"]),
        (["validate", "--help"], ["--data", "--provider", "--max-rel-error", "--report", "--latency-runs", "--image-size", "--resize",
                                  "short-side+center-crop", "--scale", "--mean", "--std", "--channel-order", "--layout"]),
    ],
    ids=["app", "compress", "analyze", "validate"],
)
def test_help(tmp_path, args, expected):
    proc = cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_no_traceback(proc)
    for word in expected:
        assert word in proc.stdout, f"{word!r} missing from {' '.join(args)}"
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# Bad input models: exit 4 (5 for a model without Conv)


def _truncated(path: Path) -> None:
    data = REAL_MODEL.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_INPUTS = {
    "missing": (lambda p: None, "not found"),
    "directory": (lambda p: p.mkdir(), "is a directory"),
    "empty": (lambda p: p.write_bytes(b""), "is empty"),
    "text": (lambda p: p.write_text("this is not a model\n" * 5), "is this an ONNX file"),
    "png": (lambda p: p.write_bytes(PNG_MAGIC + bytes(64)), "is this an ONNX file"),
    "truncated": (_truncated, "is this an ONNX file"),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_model(tmp_path, kind):
    if kind == "truncated" and not REAL_MODEL.is_file():
        pytest.skip(f"{REAL_MODEL} is missing")
    make, fragment = BAD_INPUTS[kind]
    bad = tmp_path / "bad.onnx"
    make(bad)
    before = listing(tmp_path)
    proc = cli("compress", "bad.onnx", "out.onnx", "--report", "r.json", cwd=tmp_path)
    assert_user_error(proc, 4, "bad.onnx", fragment)
    assert listing(tmp_path) == before


def test_input_model_that_onnx_runtime_rejects(work):
    """Passes the basic checker, fails in ONNX Runtime (float64 weight, float32 input): the input's fault, 4 not 6."""
    model = onnx.load(str(work / "tiny.onnx"))
    weight = next(t for t in model.graph.initializer if t.name == "w")
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight).astype(np.float64), "w"))
    onnx.save(model, work / "f64.onnx")
    before = listing(work)
    proc = cli("compress", "f64.onnx", "out.onnx", "--latency-runs", "0", cwd=work)
    assert_user_error(proc, 4, "cannot load the input model", "tensor(double)")
    assert listing(work) == before


def test_bad_input_model_in_analyze_and_validate(work):
    before = listing(work)
    assert_user_error(cli("analyze", "missing.onnx", cwd=work), 4, "missing.onnx", "not found")
    assert_user_error(cli("validate", "tiny.onnx", "missing.onnx", cwd=work), 4, "missing.onnx", "not found")
    assert listing(work) == before


def test_model_without_conv(work):
    before = listing(work)
    assert_user_error(cli("compress", "relu.onnx", "out.onnx", "--report", "r.json", cwd=work), 5, "no Conv")
    assert_user_error(cli("analyze", "relu.onnx", "--report", "a.json", cwd=work), 5, "no Conv")
    assert listing(work) == before


# --------------------------------------------------------------------------------------------------
# Output paths: exit 6, before any work, input untouched


@pytest.mark.parametrize("spelling", ["dir/model.onnx", "dir/../dir/model.onnx", "ABSOLUTE"])
def test_output_is_the_input(tmp_path, assets, spelling):
    (tmp_path / "dir").mkdir()
    model = tmp_path / "dir" / "model.onnx"
    shutil.copy(assets / "tiny.onnx", model)
    digest, before = sha256(model), listing(tmp_path)
    output = str(model) if spelling == "ABSOLUTE" else spelling
    assert_user_error(cli("compress", "dir/model.onnx", output, cwd=tmp_path), 6, "is the input model")
    assert sha256(model) == digest
    assert listing(tmp_path) == before


@pytest.mark.parametrize(
    "output, fragment",
    [("nodir/out.onnx", "does not exist"), ("somefile.txt/out.onnx", "is not a directory"), ("adir", "is a directory")],
    ids=["missing_dir", "parent_is_a_file", "output_is_a_dir"],
)
def test_output_directory_unusable(work, output, fragment):
    (work / "somefile.txt").write_text("a file, not a directory\n")
    (work / "adir").mkdir()
    before = listing(work)
    assert_user_error(cli("compress", "tiny.onnx", output, "--report", "r.json", cwd=work), 6, "output", fragment)
    assert listing(work) == before


@pytest.mark.parametrize(
    "report, fragment",
    [("tiny.onnx", "is the input model"), ("out.onnx", "is the output model"), ("nodir/r.json", "does not exist")],
    ids=["report_is_input", "report_is_output", "report_dir_missing"],
)
def test_compress_report_path_unusable(work, report, fragment):
    digest, before = sha256(work / "tiny.onnx"), listing(work)
    assert_user_error(cli("compress", "tiny.onnx", "out.onnx", "--report", report, cwd=work), 6, "report", fragment)
    assert sha256(work / "tiny.onnx") == digest
    assert listing(work) == before


def test_analyze_and_validate_never_write_a_report_over_a_model(work):
    shutil.copy(work / "tiny.onnx", work / "copy.onnx")
    digests, before = {p: sha256(work / p) for p in ("tiny.onnx", "copy.onnx")}, listing(work)
    assert_user_error(cli("analyze", "tiny.onnx", "--report", "tiny.onnx", cwd=work), 6, "is the input model")
    assert_user_error(cli("analyze", "tiny.onnx", "--report", "nodir/a.json", cwd=work), 6, "does not exist")
    proc = cli("validate", "tiny.onnx", "copy.onnx", "--report", "./copy.onnx", cwd=work)
    assert_user_error(proc, 6, "is the compressed model")
    assert {p: sha256(work / p) for p in digests} == digests
    assert listing(work) == before


def test_output_directory_not_writable(tmp_path, assets, monkeypatch):
    """Root ignores permission bits, so the not-writable branch is driven through ``os.access``."""
    from onnxfactor.errors import OutputError
    from onnxfactor.pipeline import _preflight_output

    source = assets / "tiny.onnx"
    _preflight_output(source, tmp_path / "out.onnx", tmp_path / "r.json")  # writable: passes
    monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: False)
    with pytest.raises(OutputError, match="cannot write the output to .*permission denied"):
        _preflight_output(source, tmp_path / "out.onnx", None)
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# Usage errors: exit 2


RANK_FILES = {
    "missing": (None, "not found"),
    "invalid_json": ("{conv1: [8, 8]", "not valid JSON"),
    "unknown_node": (json.dumps({"conv9": [8, 8]}), "unknown Conv node(s) conv9"),
    "out_of_range": (json.dumps({"conv1": {"out": 999, "in": 8}}), "999 must be an integer in [1, 64]"),
    "not_an_object": (json.dumps([8, 8]), "must hold a JSON object"),
    "bad_entry": (json.dumps({"conv1": {"out": 8, "middle": 3}}), "takes {\"out\": R_out"),
}


@pytest.mark.parametrize("kind", list(RANK_FILES))
def test_bad_rank_file(work, kind):
    content, fragment = RANK_FILES[kind]
    if content is not None:
        (work / "ranks.json").write_text(content)
    before = listing(work)
    proc = cli("compress", "tiny.onnx", "out.onnx", "--rank-file", "ranks.json", "--report", "r.json", cwd=work)
    assert_user_error(proc, 2, "rank file", "ranks.json", fragment)
    assert listing(work) == before


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--input-shape", "x=1xAx3"], ["--input-shape", "x=1xAx3", "positive integers"]),
        (["--input-shape", "nope=1x32x16x16"], ["--input-shape", "'nope'", "inputs: x"]),
        (["--provider", "nope"], ["'nope'", "available:", "CPUExecutionProvider"]),
        (["--data", "nope.npz"], ["--data", "nope.npz"]),
        (["--ranks", "file"], ["--rank-file"]),
        (["--target-speedup", "2", "--no-measure"], ["--target-speedup", "--no-measure"]),
        (["--target-speedup", "2", "--max-latency-ms", "3"], ["--target-speedup", "--max-latency-ms", "not both"]),
    ],
    ids=["input_shape_spec", "input_shape_name", "provider", "data_missing", "ranks_file_without_file", "budget_without_measure", "two_budgets"],
)
def test_bad_option(work, args, fragments):
    before = listing(work)
    proc = cli("compress", "tiny.onnx", "out.onnx", "--report", "r.json", "--latency-runs", "0", *args, cwd=work)
    assert_user_error(proc, 2, *fragments)
    # A bad --provider / --data is found at validation time, after the report had figures to hold.
    assert sorted(set(listing(work)) - {"r.json"}) == before


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["compress", "tiny.onnx", "out.onnx", "--weaken", "3"], "--weaken"),
        (["compress", "tiny.onnx", "out.onnx", "--ranks", "magic"], "--ranks"),
        (["compress", "tiny.onnx"], "OUTPUT_MODEL"),
        (["squash", "tiny.onnx"], "squash"),
        ([], "compress"),
    ],
    ids=["weaken_range", "ranks_choice", "missing_argument", "unknown_command", "no_arguments"],
)
def test_click_usage_error(work, args, fragment):
    """typer/click's own usage errors: exit 2 and a usage message (help for no arguments), never a traceback."""
    before = listing(work)
    proc = cli(*args, cwd=work)
    assert proc.returncode == 2, proc.stderr
    assert_no_traceback(proc)
    assert fragment.lower() in (proc.stderr if args else proc.stdout).lower()
    assert listing(work) == before


# --------------------------------------------------------------------------------------------------
# Happy paths: the reported figures against our own ONNX Runtime runs


@pytest.fixture(scope="module")
def compressed(assets, tmp_path_factory):
    """``compress tiny.onnx out.onnx --data data.npz --report r.json``, run once for the tests below."""
    work = tmp_path_factory.mktemp("compress")
    for name in ("tiny.onnx", "data.npz"):
        shutil.copy(assets / name, work / name)
    digest = sha256(work / "tiny.onnx")
    # --no-measure: decisions by MACs, so the figures below do not depend on this machine's timings
    proc = cli("compress", "tiny.onnx", "out.onnx", "--data", "data.npz", "--report", "r.json", "--no-measure", cwd=work)
    return work, proc, digest, listing(work)


def test_compress(compressed):
    work, proc, digest, files = compressed
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""  # no progress-bar residue when stderr is not a terminal
    assert files == ["data.npz", "out.onnx", "r.json", "tiny.onnx"]  # no temporary files left
    assert sha256(work / "tiny.onnx") == digest
    assert "decomposed 1 of 1 Conv layers" in proc.stdout

    out = work / "out.onnx"
    onnx.checker.check_model(str(out), full_check=True)
    assert [n.op_type for n in onnx.load(str(out)).graph.node].count("Conv") == 3  # 1x1 -> 3x3 core -> 1x1

    report = json.loads((work / "r.json").read_text())
    assert report["summary"]["decomposed"] == 1
    assert report["summary"]["conv_candidates"] == 1
    (layer,) = report["layers"]
    assert layer["name"] == "conv1" and layer["status"] == "decomposed"
    assert layer["ranks"] == {"out": RANK_OUT, "in": RANK_IN}
    assert {m["mode"]: m["vbmf_rank"] for m in layer["modes"]} == {"out": RANK_OUT, "in": RANK_IN}
    assert layer["params_before"] == 64 * 32 * 9
    assert layer["params_after"] == 64 * RANK_OUT + RANK_OUT * RANK_IN * 9 + RANK_IN * 32
    assert layer["rel_reconstruction_error"] < 0.05

    x = np.load(work / "data.npz")["x"]
    a, b = outputs_of(work / "tiny.onnx", x), outputs_of(out, x)
    validation = report["validation"]
    assert validation["samples"] == 3
    (o,) = validation["outputs"]
    assert o["name"] == "y"
    expected = rel_l2(a, b)
    assert 1e-4 < expected < 0.05  # lossy, but only by the 1 % noise
    assert o["rel_l2"] == pytest.approx(expected, rel=1e-6)
    assert o["max_abs"] == pytest.approx(float(np.abs(a.astype(np.float64) - b).max()), rel=1e-6)
    assert validation["latency_original"]["runs"] == 50 and validation["latency_compressed"]["runs"] == 50


def test_compress_measured_never_writes_a_model_it_measured_slower(work):
    """The default (--measure): real ONNX Runtime timings, so only the guard's invariant is asserted."""
    proc = cli("compress", "tiny.onnx", "out.onnx", "--report", "r.json", "--latency-runs", "0", "--threads", "1", cwd=work)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((work / "r.json").read_text())
    (layer,) = report["layers"]
    assert layer["latency"]["original_ms"] > 0 and layer["latency"]["chain_ms"] > 0
    assert len(layer["latency"]["options"]) >= 2  # the VBMF ranks (8, 8) and rounded to 16
    assert report["speed"]["threads"] == 1 and report["speed"]["providers"] == ["CPUExecutionProvider"]
    if layer["status"] == "decomposed":
        assert report["speed"]["rounds"][-1]["speedup"] >= 1.0
        assert "end to end with 1 decomposed layers" in proc.stdout
    else:
        assert layer["reason"].startswith(("measured not faster", "rolled back by the end-to-end guard"))
        assert [n.op_type for n in onnx.load(str(work / "out.onnx")).graph.node].count("Conv") == 1


def test_plot_of_a_measured_report(work, monkeypatch):
    proc = cli("compress", "tiny.onnx", "out.onnx", "--report", "r.json", "--no-validate", "--threads", "1", cwd=work)
    assert proc.returncode == 0, proc.stderr
    proc = cli("plot", "r.json", "p.png", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "plotted 1 timed layers to p.png" in proc.stdout
    assert (work / "p.png").read_bytes().startswith(PNG_MAGIC)

    from onnxfactor.errors import UsageError
    from onnxfactor.plot import layer_points, plot_layer_speed

    (point,) = layer_points(json.loads((work / "r.json").read_text()))
    assert point["name"] == "conv1" and point["macs_ratio"] > 1 and point["speedup"] > 0
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the [plot] extra were not installed
    with pytest.raises(UsageError, match=r"pip install 'onnxfactor\[plot\]'"):
        plot_layer_speed(work / "r.json", work / "q.png")


def test_plot_needs_per_layer_timings(work):
    proc = cli("compress", "tiny.onnx", "out.onnx", "--report", "r.json", "--no-validate", "--no-measure", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert_user_error(cli("plot", "r.json", "p.png", cwd=work), 2, "no per-layer timings", "--measure")
    assert not (work / "p.png").exists()


def test_compress_max_rel_error_miss_writes_no_model(work):
    before = listing(work)
    proc = cli("compress", "tiny.onnx", "out.onnx", "--max-rel-error", "1e-9", "--report", "r.json", "--latency-runs", "0", "--no-measure", cwd=work)
    assert_user_error(proc, 3, "exceeds --max-rel-error 1e-09", "no model written")
    assert listing(work) == sorted(before + ["r.json"])  # the report, no model, no temporary file
    report = json.loads((work / "r.json").read_text())
    assert report["validation"]["outputs"][0]["rel_l2"] > 1e-9
    assert report["output_path"] is None


def test_analyze(work):
    before = listing(work)
    proc = cli("analyze", "tiny.onnx", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert listing(work) == before  # writes nothing
    assert "Analysis (nothing written)" in proc.stdout
    assert "conv1" in proc.stdout and "would decompose" in proc.stdout
    assert f"out={RANK_OUT}/64, in={RANK_IN}/32" in proc.stdout
    assert "VBMF noise variance: conv1: out sigma2=" in proc.stdout

    proc = cli("analyze", "tiny.onnx", "--report", "a.json", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert listing(work) == sorted(before + ["a.json"])
    (layer,) = json.loads((work / "a.json").read_text())["layers"]
    assert layer["status"] == "would decompose"
    modes = {m["mode"]: m for m in layer["modes"]}
    assert set(modes) == {"out", "in"}
    assert modes["out"]["vbmf_rank"] == RANK_OUT and modes["in"]["vbmf_rank"] == RANK_IN
    assert all(isinstance(m["sigma2"], float) and m["sigma2"] > 0 for m in modes.values())


def test_analyze_auto_method_with_the_error_policy(work):
    proc = cli("analyze", "tiny.onnx", "--method", "auto", "--ranks", "error", "--target-error", "0.05", "--report", "a.json", cwd=work)
    assert proc.returncode == 0, proc.stderr
    (layer,) = json.loads((work / "a.json").read_text())["layers"]
    assert layer["status"] == "would decompose" and layer["rel_reconstruction_error"] <= 0.05
    assert [c["method"] for c in layer["candidates"]] == ["tucker2", "cp3", "cp4", "tucker3"]
    winner = min((c for c in layer["candidates"] if "macs" in c), key=lambda c: c["macs"])
    assert layer["ranks"] == winner["ranks"] and layer["macs_after"] == winner["macs"]
    assert all(m["note"].startswith("cheapest chain with relative error <= 0.05 (auto: ") for m in layer["modes"])


def test_validate(compressed):
    work, compress_proc, _, _ = compressed
    assert compress_proc.returncode == 0, compress_proc.stderr
    original, out = work / "tiny.onnx", work / "out.onnx"

    proc = cli("validate", "tiny.onnx", "out.onnx", "--data", "data.npz", "--report", "v.json", "--latency-runs", "0", cwd=work)
    assert proc.returncode == 0, proc.stderr
    x = np.load(work / "data.npz")["x"]
    a, b = outputs_of(original, x), outputs_of(out, x)
    v = json.loads((work / "v.json").read_text())
    assert v["samples"] == 3 and v["latency_original"] is None
    (o,) = v["outputs"]
    assert o["rel_l2"] == pytest.approx(rel_l2(a, b), rel=1e-6)
    assert v["worst_rel_l2"] == o["rel_l2"]
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    assert o["cosine"] == pytest.approx(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)), rel=1e-9)

    # a task metric: here each sample's relative L2 error, averaged over the samples
    (work / "per_sample.py").write_text(
        "import numpy as np\n"
        "def score(original, compressed):\n"
        "    (a,), (b,) = original.values(), compressed.values()\n"
        "    d = (a - b).reshape(len(a), -1)\n"
        "    return np.linalg.norm(d, axis=1) / np.linalg.norm(a.reshape(len(a), -1), axis=1)\n"
        "def broken(original, compressed):\n"
        "    return original['no such output']\n")
    proc = cli("validate", "tiny.onnx", "out.onnx", "--data", "data.npz", "--metric", "per_sample.py", "--report", "m.json",
               "--latency-runs", "0", cwd=work)
    assert proc.returncode == 0, proc.stderr
    flat_a, flat_b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    expected = np.mean(np.linalg.norm(flat_a - flat_b, axis=1) / np.linalg.norm(flat_a, axis=1))
    assert json.loads((work / "m.json").read_text())["task_metric"] == pytest.approx(expected, rel=1e-5)
    assert f"task metric per_sample.py:score: {expected:.4f}" in proc.stdout
    assert_user_error(cli("validate", "tiny.onnx", "out.onnx", "--metric", "per_sample.py:broken", cwd=work), 2,
                      "metric per_sample.py:broken failed: KeyError")
    assert_user_error(cli("compress", "tiny.onnx", "o2.onnx", "--metric", "missing.py", cwd=work), 2, "--metric script", "does not exist")
    assert not (work / "o2.onnx").exists()

    # Default inputs: standard normal from default_rng(seed 0), dynamic batch axis -> 1.
    proc = cli("validate", "tiny.onnx", "out.onnx", "--max-rel-error", "1e-9", "--report", "v0.json", "--latency-runs", "0", cwd=work)
    assert_user_error(proc, 3, "exceeds --max-rel-error 1e-09")
    x0 = np.random.default_rng(0).standard_normal((1, 32, 16, 16)).astype(np.float32)
    v0 = json.loads((work / "v0.json").read_text())
    assert v0["input_source"] == "random (seed 0)"
    assert v0["outputs"][0]["rel_l2"] == pytest.approx(rel_l2(outputs_of(original, x0), outputs_of(out, x0)), rel=1e-6)


# --------------------------------------------------------------------------------------------------
# validate on an image folder; bad data


def image_conv_model(bias: float = 0.0) -> onnx.ModelProto:
    """Conv 3->4 3x3 (pad 1) on ``x`` ``[N, 3, 8, 8]``; ``bias`` shifts every output."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = np.full(4, bias, np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])], "image_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_validate_on_an_image_folder(tmp_path):
    image = pytest.importorskip("PIL.Image")
    from onnxfactor.data import open_source

    onnx.save(image_conv_model(), tmp_path / "a.onnx")
    onnx.save(image_conv_model(bias=0.1), tmp_path / "b.onnx")
    rng = np.random.default_rng(0)
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    for i in range(5):
        folder = tmp_path / "photos" / ("sub" if i % 2 else "")
        image.fromarray(rng.integers(0, 256, (12 + i, 10, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    proc = cli("validate", "a.onnx", "b.onnx", "--data", "photos", "--report", "v.json", "--latency-runs", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["samples"] == 5 and v["input_source"] == "images in photos/ (5 files, stretch 8x8)"
    x = np.concatenate([b.feeds["x"] for b in open_source(tmp_path / "photos", image_conv_model()).batches()])
    a, b = outputs_of(tmp_path / "a.onnx", x), outputs_of(tmp_path / "b.onnx", x)
    assert v["outputs"][0]["rel_l2"] == pytest.approx(rel_l2(a, b), rel=1e-6)

    proc = cli("validate", "a.onnx", "b.onnx", "--data", "photos", "--image-size", "8by8", cwd=tmp_path)
    assert_user_error(proc, 2, "--image-size", "'8by8'")


def test_validate_refuses_nan_data(work):
    x = np.random.default_rng(1).standard_normal((3, 32, 16, 16)).astype(np.float32)
    x[2, 0, 5, 5] = np.nan
    np.savez(work / "nan.npz", x=x)
    proc = cli("validate", "tiny.onnx", "tiny.onnx", "--data", "nan.npz", "--latency-runs", "0", cwd=work)
    assert_user_error(proc, 2, "array 'x' in nan.npz holds NaN at sample 2; remove or fix that sample")
