"""Real clients run our output: RapidOCR and NudeNet load the compressed models through their own
constructors and give the same answers as with the originals on real photos (tools/clients.py).

The config is the energy policy at 0.995 (round_to 1): measured on these mobile models, it is the
kind of setting that keeps the clients' answers. Weakened VBMF does not: at w=0.6 (round_to 16)
RapidOCR reads no line of ``page`` and NudeNet finds no face; at w=0.4 words merge ("Let us" ->
"Letus") and the ``camera`` face changes class; at w=0.3 with round_to 16 no layer is decomposed
at all. Timing is measured by ``python tools/clients.py``, never asserted here.

Thresholds, from the measured margins at this config: ``page``'s 5 lines identical (box IoU 1.000,
confidence differences <= 0.008), faces with IoU 1.000 / 0.988 and score differences 0.017 / 0.000.
A single layer of NudeNet at weakened w=0.2 already moves a score by 0.048 and a box to IoU 0.936,
so box IoU >= 0.9 and score difference <= 0.05 catch a real change while leaving room for noise.
"""

from __future__ import annotations

import pytest

from onnxfactor import compress_file
from tools import clients, model_zoo

CONFIG = clients.client_config(round_to=1, energy=0.995)
MIN_IOU = 0.9
MAX_SCORE_DIFF = 0.05


@pytest.fixture(scope="module")
def compressed(tmp_path_factory) -> dict:
    """The three client models compressed once for this module: {name: path}."""
    return clients.compress_for_clients(tmp_path_factory.mktemp("clients"), CONFIG)


def test_every_client_model_is_actually_changed(compressed):
    for name, report in clients.load_reports(compressed).items():
        decomposed = [layer for layer in report["layers"] if layer["status"] == "decomposed"]
        assert decomposed, f"{name}: no layer decomposed, the comparison below would be vacuous"
        assert report["totals"]["conv_params_after"] < report["totals"]["conv_params_before"], name


def test_rapidocr_reads_the_same_text(compressed):
    original = clients.original_models()
    result = clients.ocr_compare(original["det"], compressed["det"], original["rec"], compressed["rec"],
                                 clients.load_images(["page"]), repeats=0)
    page = result["images"]["page"]
    assert len(page["lines_original"]) >= 5, page["lines_original"]  # the scanned page's 5 lines
    assert [line["text"] for line in page["lines_compressed"]] == [line["text"] for line in page["lines_original"]]
    assert len(page["paired"]) == len(page["lines_original"])
    assert page["min_box_iou"] >= MIN_IOU
    assert page["max_confidence_diff"] <= MAX_SCORE_DIFF


@pytest.mark.parametrize("image", ["astronaut", "camera"])
def test_nudenet_finds_the_same_detections(compressed, image):
    result = clients.detector_compare(clients.original_models()["nudenet"], compressed["nudenet"],
                                      clients.load_images([image]), repeats=0)
    found = result["images"][image]
    assert len(found["detections_original"]) >= 1  # a face: the comparison is not vacuous
    assert len(found["detections_compressed"]) == len(found["detections_original"])
    assert found["classes_equal"]
    assert len(found["matched"]) == len(found["detections_original"]), found
    assert found["min_iou"] >= MIN_IOU
    assert found["max_score_diff"] <= MAX_SCORE_DIFF


def test_comparison_catches_a_broken_detector(tmp_path):
    """Weakened VBMF at w=0.6 (round_to 16) costs NudeNet its face detection: the check must see it."""
    broken = tmp_path / "nudenet_w06.onnx"
    compress_file(model_zoo.nudenet_320n(), broken, config=clients.client_config(weaken=0.6, round_to=16), validation=None)
    result = clients.detector_compare(model_zoo.nudenet_320n(), broken, clients.load_images(["astronaut"]), repeats=0)
    found = result["images"]["astronaut"]
    assert len(found["detections_original"]) >= 1
    assert len(found["matched"]) < len(found["detections_original"])
