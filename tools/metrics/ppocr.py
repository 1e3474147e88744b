"""``--metric`` functions for PP-OCR models (RapidOCR): the same text, the same text regions.

* ``rec_text`` (recogniser, output ``[N, T, classes]``): CTC greedy decoding as RapidOCR does
  (argmax per step, repeats merged, blank 0 dropped); a sample scores 1.0 when the decoded label
  sequences are identical, else 0.0.
* ``det_regions`` (detector, output ``[N, 1, H, W]`` text probabilities): RapidOCR binarises at
  0.3 and boxes the connected regions; a sample's score is the IoU of the two binary maps (1.0
  when both are empty), so ``--min-agreement 0.97`` asks for 97 % of the text pixels in common.
"""

from __future__ import annotations

import numpy as np

BINARY_THRESHOLD = 0.3


def _output(outputs: dict) -> np.ndarray:
    return np.asarray(next(iter(outputs.values())))


def _decode(row: np.ndarray) -> tuple[int, ...]:
    ids = row.argmax(axis=-1)
    keep = np.ones(len(ids), dtype=bool)
    keep[1:] = ids[1:] != ids[:-1]
    return tuple(int(i) for i in ids[keep] if i != 0)


def rec_text(original: dict, compressed: dict) -> np.ndarray:
    a, b = _output(original), _output(compressed)
    return np.array([float(_decode(a[k]) == _decode(b[k])) for k in range(len(a))])


def det_regions(original: dict, compressed: dict) -> np.ndarray:
    a, b = _output(original) > BINARY_THRESHOLD, _output(compressed) > BINARY_THRESHOLD
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    union = (a | b).sum(axis=1)
    return np.where(union == 0, 1.0, (a & b).sum(axis=1) / np.maximum(union, 1))
