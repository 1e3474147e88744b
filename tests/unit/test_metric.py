"""``--metric``: a user's task metric, loaded from a script, averaged per sample, never NaN-as-agreement."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from onnxfactor.errors import UsageError
from onnxfactor.validation import make_inputs, validate
from onnxfactor.validation.metric import MetricAccumulator, TaskMetric, as_metric
from tests.unit.test_validate import CLASSES, classifier, npz, samples  # noqa: F401 - npz is a fixture

ort = pytest.importorskip("onnxruntime")
CPU = ["CPUExecutionProvider"]

SCRIPT = """
import numpy as np

def score(original, compressed):
    # the same top-2 classes, in order, per sample
    a, b = original["y"], compressed["y"]
    return (np.argsort(-a, axis=1)[:, :2] == np.argsort(-b, axis=1)[:, :2]).all(axis=1)

def batch_mean(original, compressed):
    return float(np.mean(np.abs(original["y"] - compressed["y"]) < 0.25))

def nan(original, compressed):
    return np.full(len(original["y"]), np.nan)

def wrong_length(original, compressed):
    return np.ones(len(original["y"]) + 1)

def raises(original, compressed):
    raise KeyError("boxes")
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "task_metric.py"
    path.write_text(SCRIPT)
    return path


def _top2(y: np.ndarray) -> np.ndarray:
    return np.argsort(-y, axis=1)[:, :2]


def test_metric_in_validate_is_the_per_sample_mean_over_batches(script, npz):
    delta = np.array([0, 0, 0, 0, 6], np.float32)  # class 4 overtakes the runner-up on some samples
    original, perturbed = classifier("N"), classifier("N", bias_delta=delta)
    x = samples(10, seed=5)
    inputs = make_inputs(original, data=npz(x=x), batch_size=4)  # batches of 4, 4, 2
    result = validate(original, perturbed, inputs=inputs, providers=CPU, latency_runs=0, metric=TaskMetric(str(script)))
    from tests.conftest import run_ort

    (ya,) = run_ort(original, {"x": x})
    (yb,) = run_ort(perturbed, {"x": x})
    expected = float(np.mean((_top2(ya) == _top2(yb)).all(axis=1)))
    assert 0.0 < expected < 1.0  # the perturbation changes some answers, not all
    assert result.task_metric == pytest.approx(expected)
    assert result.task_metric_name == "task_metric.py:score"
    assert result.to_dict()["task_metric"] == pytest.approx(expected)
    identical = validate(original, classifier("N"), inputs=inputs, providers=CPU, latency_runs=0, metric=TaskMetric(str(script)))
    assert identical.task_metric == 1.0 and identical.far_from_original() is None


def test_a_batch_score_is_weighted_by_the_batch_size():
    acc = MetricAccumulator(TaskMetric(lambda a, b: float(a["y"][0, 0])))
    acc.add({"y": np.ones((3, 2))}, {}, 3)
    acc.add({"y": np.zeros((1, 2))}, {}, 1)
    assert acc.result() == pytest.approx(0.75)


def test_a_non_finite_score_counts_as_no_agreement_and_warns(script):
    model = classifier("N")
    inputs = make_inputs(model, shapes={"x": (6, 3, 4, 4)})
    result = validate(model, classifier("N"), inputs=inputs, providers=CPU, latency_runs=0, metric=TaskMetric(f"{script}:nan"))
    assert result.task_metric == 0.0
    assert "task metric task_metric.py:nan 0.000 (< 0.9)" in result.far_from_original()


@pytest.mark.parametrize("spec, match", [
    ("{script}:wrong_length", r"returned an array of shape \(7,\) for a batch of 6 samples"),
    ("{script}:raises", r"metric task_metric.py:raises failed: KeyError: 'boxes'"),
])
def test_bad_metric_results_are_one_line_usage_errors(script, spec, match):
    model = classifier("N")
    inputs = make_inputs(model, shapes={"x": (6, 3, 4, 4)})
    with pytest.raises(UsageError, match=match):
        validate(model, classifier("N"), inputs=inputs, providers=CPU, latency_runs=0, metric=TaskMetric(spec.format(script=script)))


def test_bad_metric_specs_fail_when_loaded(script, tmp_path):
    with pytest.raises(UsageError, match="takes a Python file"):
        TaskMetric("top5")
    with pytest.raises(UsageError, match="does not exist"):
        TaskMetric(str(tmp_path / "missing.py"))
    with pytest.raises(UsageError, match="has no function 'nope'"):
        TaskMetric(f"{script}:nope")
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_anywhere\n")
    with pytest.raises(UsageError, match="metric script broken.py failed on import: ModuleNotFoundError"):
        TaskMetric(str(broken))


def test_a_script_metric_pickles_without_its_function_and_reloads(script):
    metric = TaskMetric(f"{script}:batch_mean")
    clone = pickle.loads(pickle.dumps(metric))
    assert clone._fn is None and clone.name == "task_metric.py:batch_mean"
    y = np.zeros((4, CLASSES), np.float32)
    assert clone.scores({"y": y}, {"y": y + np.array([[0.0], [0.0], [1.0], [1.0]], np.float32)}, 4).tolist() == [0.5] * 4
    assert as_metric(None) is None and as_metric(metric) is metric
