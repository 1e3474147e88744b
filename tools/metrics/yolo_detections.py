"""``--metric`` for YOLOv8-style detectors (NudeNet 320n): does the compressed model find the same things?

Output ``[N, 4 + classes, anchors]`` (centre x, y, width, height, then class scores), decoded as
NudeNet's engine does: an anchor is a detection when its best class score is >= ``THRESHOLD``
(0.25, NudeNet's NMS score threshold), then greedy NMS at IoU 0.45. A sample scores 1.0 when
every *confident* detection (score >= ``CONFIDENT``, 0.3) of either model has a partner in the
other model of the same class with box IoU >= ``MIN_IOU`` (0.9) and score difference <=
``MAX_SCORE_DIFF`` (0.05), the partner being searched down to ``THRESHOLD - MAX_SCORE_DIFF`` (so a
detection at 0.32 that drops to 0.28 is the same answer, one that drops to 0.2 is not); else 0.0.
Detections between 0.25 and 0.3 are left out: measured on NudeNet, decomposing a single layer
at 75 % of its ranks already moves one from 0.265 to 0.202, so requiring them forbids any
compression, while the answers that matter (the evaluation photos' faces score 0.58 and 0.72)
are confident ones. The thresholds are those the client benchmarks
use on the engines' own output (``tools/bench_clients_calibration.py``)::

    onnxfactor search 320n.onnx out.onnx --calibration ... --data ... \\
        --metric tools/metrics/yolo_detections.py --min-agreement 1.0
"""

from __future__ import annotations

import numpy as np

THRESHOLD, CONFIDENT, NMS_IOU, MIN_IOU, MAX_SCORE_DIFF = 0.25, 0.3, 0.45, 0.9, 0.05


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each of ``boxes`` (k x 4)."""
    lo, hi = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    area = lambda b: np.prod(np.clip(b[..., 2:] - b[..., :2], 0, None), axis=-1)  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-9)


def detections(pred: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes xyxy, classes, scores) of one sample's ``[4 + classes, anchors]`` output after NMS."""
    scores_all = pred[4:]
    cls, score = scores_all.argmax(axis=0), scores_all.max(axis=0)
    keep = np.flatnonzero(score >= threshold)
    cx, cy, w, h = pred[:4, keep]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    order = np.argsort(-score[keep], kind="stable")
    chosen = []
    while order.size:
        i = order[0]
        chosen.append(i)
        order = order[1:][_iou(boxes[i], boxes[order[1:]]) <= NMS_IOU] if order.size > 1 else order[1:]
    chosen = np.asarray(chosen, dtype=int)
    return boxes[chosen].reshape(-1, 4), cls[keep][chosen], score[keep][chosen]


def _covered(a, b) -> bool:
    """Every detection of ``a`` (threshold) has a partner in ``b`` (lower threshold)."""
    boxes_b, cls_b, score_b = b
    for box, c, s in zip(*a):
        same = np.flatnonzero(cls_b == c)
        if same.size == 0:
            return False
        ious = _iou(box, boxes_b[same])
        if not ((ious >= MIN_IOU) & (np.abs(score_b[same] - s) <= MAX_SCORE_DIFF)).any():
            return False
    return True


def _output(outputs: dict) -> np.ndarray:
    return np.asarray(next(iter(outputs.values())), dtype=np.float64)


def score(original: dict, compressed: dict) -> np.ndarray:
    a, b = _output(original), _output(compressed)
    out = np.zeros(len(a))
    for k in range(len(a)):
        da, db = detections(a[k], CONFIDENT), detections(b[k], CONFIDENT)
        la, lb = detections(a[k], THRESHOLD - MAX_SCORE_DIFF), detections(b[k], THRESHOLD - MAX_SCORE_DIFF)
        out[k] = float(_covered(da, lb) and _covered(db, la))
    return out


def count(original: dict, compressed: dict) -> np.ndarray:
    """Not a metric: the original's detections per sample (to check a selection set has some)."""
    a = _output(original)
    return np.array([len(detections(a[k], THRESHOLD)[2]) for k in range(len(a))], dtype=float)
