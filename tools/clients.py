"""Real clients run onnxfactor's output: RapidOCR and NudeNet with original vs compressed models.

The models of two PyPI packages are compressed with the library API and handed back to the
packages' own engines, which run their own pre- and post-processing on real photos from
``skimage.data`` (bundled in the scikit-image wheel, no download):

* ``rapidocr_onnxruntime`` 1.4.4, ``RapidOCR(det_model_path=..., rec_model_path=...)``: PP-OCRv4
  text detection + recognition (the direction classifier stays the packaged one). Compared per
  image: the recognised lines (exact equality, in the engine's own reading order), a character
  similarity of the joined text (``difflib`` ratio), the IoU of paired text boxes, and the
  recognition confidences.
* ``nudenet`` 3.4.2, ``NudeDetector(model_path=...)``: a YOLOv8n detector at 320x320. Compared per
  image: detections paired by class and box IoU (greedy, best IoU first), their count, IoU and
  score differences.

End-to-end time per image (the engine's whole call, pre- and post-processing included) is the
median of ``repeats`` runs, original and compressed interleaved so that drifts of a shared machine
hit both; it is reported, never asserted. Every engine keeps its own ONNX Runtime defaults.

    python tools/clients.py [--out out/clients.json] [--weaken 0.6 | --energy 0.995] [--round-to 16] [--repeats 5]

Needs ``pip install -r requirements-clients.txt`` (OpenCV and the engines' other runtime
dependencies) on top of ``requirements-models.txt``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `tools` and `onnxfactor` importable
    sys.path.insert(0, str(ROOT))

from tools import model_zoo

# skimage.data photos bundled in the wheel. "page" is a scanned book page (5 lines of English),
# "text" a photo of a handwritten formula, "coins" has an engraving the detector picks up; for
# NudeNet, "astronaut" (a woman's face) and "camera" (a man's face) give detections, "chelsea"
# (a cat) none: the compressed model must not invent one.
OCR_IMAGES = ("page", "text", "coins")
DETECTOR_IMAGES = ("astronaut", "camera", "chelsea")

# Input shapes at which the dynamic PP-OCR models are analysed (MAC counting only: the
# compressed models keep their dynamic axes). NudeNet's input is static (1x3x320x320).
INPUT_SHAPES = {"det": {"x": (1, 3, 640, 640)}, "rec": {"x": (1, 3, 48, 320)}, "nudenet": None}


def original_models() -> dict[str, Path]:
    """The packaged models the clients load by default, keyed like :func:`compress_for_clients`."""
    return {"det": model_zoo.ppocr("det"), "rec": model_zoo.ppocr("rec"), "nudenet": model_zoo.nudenet_320n()}


def client_config(weaken: float = 0.6, round_to: int = 16, energy: float | None = None):
    """The compress config of this tool: Tucker-2 at ``weakened`` VBMF ranks, rounded up to
    multiples of ``round_to``; with ``energy``, at the ``energy`` policy's ranks instead."""
    from onnxfactor import CompressConfig, RankConfig

    if energy is not None:
        return CompressConfig(ranks=RankConfig(policy="energy", energy=energy, round_to=round_to))
    return CompressConfig(ranks=RankConfig(policy="weakened", weaken=weaken, round_to=round_to))


def compress_for_clients(workdir: str | os.PathLike, config=None) -> dict[str, Path]:
    """Compress PP-OCRv4 det, rec and NudeNet 320n into ``workdir``; the compressed models' paths.

    Writes ``<name>.onnx`` and its compress report ``<name>.report.json`` (see
    :func:`load_reports`) for ``name`` in ``det``, ``rec``, ``nudenet``. ``config`` defaults to
    :func:`client_config`. The library's random-input validation is skipped: the clients'
    comparison on real images is the validation here.
    """
    from onnxfactor import compress_file

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = config if config is not None else client_config()
    paths = {}
    for name, source in original_models().items():
        target = workdir / f"{name}.onnx"
        compress_file(source, target, config=config, input_shapes=INPUT_SHAPES[name], validation=None,
                      report_path=_report_path(target))
        paths[name] = target
    return paths


def _report_path(model_path: Path) -> Path:
    return model_path.with_suffix(".report.json")


def load_reports(paths: Mapping[str, Path]) -> dict[str, dict]:
    """The JSON compress reports written by :func:`compress_for_clients`, keyed like ``paths``."""
    return {name: json.loads(_report_path(Path(path)).read_text()) for name, path in paths.items()}


def load_image(name: str) -> np.ndarray:
    """A ``skimage.data`` image as the engines expect an array: 3-channel BGR uint8 (what
    ``cv2.imread`` returns; RapidOCR takes a 3-channel array as BGR, NudeNet does the same)."""
    import cv2
    import skimage.data

    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_RGBA2BGR)
    return cv2.cvtColor(image, cv2.COLOR_RGB2BGR)


def load_images(names: Sequence[str]) -> dict[str, np.ndarray]:
    return {name: load_image(name) for name in names}


def ocr_compare(det_original, det_compressed, rec_original, rec_compressed,
                images: Mapping[str, np.ndarray], *, repeats: int = 5) -> dict:
    """Run RapidOCR with the original and with the compressed det/rec models on ``images``.

    ``images`` maps a name to a BGR uint8 array (:func:`load_image`). Per image: the lines each
    engine recognised (``[text, confidence, box]`` in the engine's reading order), whether the
    line lists are identical, the character similarity of the joined texts, the text boxes paired
    by IoU (axis-aligned hulls of the quadrilaterals) with equal-text flags, and the median
    end-to-end time of ``repeats`` interleaved calls (ms). ``summary`` aggregates over images.
    """
    from rapidocr_onnxruntime import RapidOCR

    original = RapidOCR(det_model_path=str(det_original), rec_model_path=str(rec_original))
    compressed = RapidOCR(det_model_path=str(det_compressed), rec_model_path=str(rec_compressed))

    def read(engine, image) -> list[dict]:
        result, _ = engine(image)
        return [{"text": text, "confidence": float(score), "box": _quad_to_xyxy(box)} for box, text, score in result or []]

    per_image = {}
    for name, image in images.items():
        lines_a, lines_b = read(original, image), read(compressed, image)  # also the warm-up
        ms_a, ms_b = _interleaved_median_ms(partial(original, image), partial(compressed, image), repeats)
        texts_a, texts_b = [l["text"] for l in lines_a], [l["text"] for l in lines_b]
        pairs = _pair_boxes([l["box"] for l in lines_a], [l["box"] for l in lines_b])
        paired = [
            {"original": texts_a[i], "compressed": texts_b[j], "equal": texts_a[i] == texts_b[j], "iou": iou,
             "confidence_diff": abs(lines_a[i]["confidence"] - lines_b[j]["confidence"])}
            for i, j, iou in pairs
        ]
        per_image[name] = {
            "lines_original": lines_a,
            "lines_compressed": lines_b,
            "text_identical": texts_a == texts_b,
            "char_similarity": difflib.SequenceMatcher(None, "\n".join(texts_a), "\n".join(texts_b)).ratio(),
            "paired": paired,
            "min_box_iou": min((p["iou"] for p in paired), default=None),
            "mean_box_iou": _mean(p["iou"] for p in paired),
            "max_confidence_diff": max((p["confidence_diff"] for p in paired), default=None),
            "ms_original": ms_a,
            "ms_compressed": ms_b,
        }
    results = list(per_image.values())
    return {
        "images": per_image,
        "summary": {
            "lines_original": sum(len(r["lines_original"]) for r in results),
            "all_text_identical": all(r["text_identical"] for r in results),
            "min_char_similarity": min((r["char_similarity"] for r in results), default=None),
            "min_box_iou": _min_defined(r["min_box_iou"] for r in results),
            "ms_original": _sum_defined(r["ms_original"] for r in results),
            "ms_compressed": _sum_defined(r["ms_compressed"] for r in results),
        },
    }


def detector_compare(original, compressed, images: Mapping[str, np.ndarray], *, repeats: int = 5) -> dict:
    """Run NudeNet's ``NudeDetector`` with the original and the compressed 320n model on ``images``.

    Per image: both detection lists (``class``, ``score``, ``box`` as ``[x, y, w, h]`` in pixels),
    the detections paired by class and IoU (greedy, best IoU first, IoU > 0), the unmatched ones
    on each side, mean/min IoU and the largest score difference of the pairs, and the median
    end-to-end ``detect`` time of ``repeats`` interleaved calls (ms).
    """
    from nudenet import NudeDetector

    detector_a = NudeDetector(model_path=str(original), inference_resolution=320)
    detector_b = NudeDetector(model_path=str(compressed), inference_resolution=320)

    per_image = {}
    for name, image in images.items():
        found_a, found_b = detector_a.detect(image), detector_b.detect(image)  # also the warm-up
        ms_a, ms_b = _interleaved_median_ms(partial(detector_a.detect, image), partial(detector_b.detect, image), repeats)
        pairs = _pair_boxes([_xywh_to_xyxy(d["box"]) for d in found_a], [_xywh_to_xyxy(d["box"]) for d in found_b],
                            labels_a=[d["class"] for d in found_a], labels_b=[d["class"] for d in found_b])
        matched = [
            {"class": found_a[i]["class"], "iou": iou, "score_original": found_a[i]["score"],
             "score_compressed": found_b[j]["score"], "score_diff": abs(found_a[i]["score"] - found_b[j]["score"])}
            for i, j, iou in pairs
        ]
        per_image[name] = {
            "detections_original": found_a,
            "detections_compressed": found_b,
            "matched": matched,
            "unmatched_original": [found_a[i] for i in sorted(set(range(len(found_a))) - {i for i, _, _ in pairs})],
            "unmatched_compressed": [found_b[j] for j in sorted(set(range(len(found_b))) - {j for _, j, _ in pairs})],
            "classes_equal": sorted(d["class"] for d in found_a) == sorted(d["class"] for d in found_b),
            "min_iou": min((m["iou"] for m in matched), default=None),
            "mean_iou": _mean(m["iou"] for m in matched),
            "max_score_diff": max((m["score_diff"] for m in matched), default=None),
            "ms_original": ms_a,
            "ms_compressed": ms_b,
        }
    results = list(per_image.values())
    return {
        "images": per_image,
        "summary": {
            "detections_original": sum(len(r["detections_original"]) for r in results),
            "detections_compressed": sum(len(r["detections_compressed"]) for r in results),
            "matched": sum(len(r["matched"]) for r in results),
            "all_classes_equal": all(r["classes_equal"] for r in results),
            "min_iou": _min_defined(r["min_iou"] for r in results),
            "max_score_diff": max((r["max_score_diff"] for r in results if r["max_score_diff"] is not None), default=None),
            "ms_original": _sum_defined(r["ms_original"] for r in results),
            "ms_compressed": _sum_defined(r["ms_compressed"] for r in results),
        },
    }


def _interleaved_median_ms(run_a: Callable[[], object], run_b: Callable[[], object], repeats: int) -> tuple[float | None, float | None]:
    """Median wall time (ms) of ``repeats`` calls of each function, run a, b, a, b, ...; None if 0."""
    if repeats < 1:
        return None, None
    times_a, times_b = [], []
    for _ in range(repeats):
        for run, times in ((run_a, times_a), (run_b, times_b)):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times_a), statistics.median(times_b)


def _quad_to_xyxy(quad) -> list[float]:
    """The axis-aligned hull ``[x0, y0, x1, y1]`` of RapidOCR's 4-point text box."""
    points = np.asarray(quad, dtype=np.float64)
    return [*points.min(axis=0).tolist(), *points.max(axis=0).tolist()]


def _xywh_to_xyxy(box) -> list[float]:
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y + h]


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x0, y0, x1, y1]`` boxes (0 when both are empty)."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _pair_boxes(boxes_a, boxes_b, labels_a=None, labels_b=None) -> list[tuple[int, int, float]]:
    """Greedy one-to-one pairing ``(i, j, iou)``, best IoU first, of overlapping boxes (of equal
    labels, when labels are given), sorted by ``i``."""
    labels_a = labels_a if labels_a is not None else [None] * len(boxes_a)
    labels_b = labels_b if labels_b is not None else [None] * len(boxes_b)
    candidates = sorted(
        ((_iou(a, b), i, j) for i, a in enumerate(boxes_a) for j, b in enumerate(boxes_b) if labels_a[i] == labels_b[j]),
        reverse=True,
    )
    used_a, used_b, pairs = set(), set(), []
    for iou, i, j in candidates:
        if iou > 0 and i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            pairs.append((i, j, iou))
    return sorted(pairs)


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _min_defined(values) -> float | None:
    return min((v for v in values if v is not None), default=None)


def _sum_defined(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) if values else None


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def render(result: dict) -> str:
    """A plain markdown summary of :func:`main`'s result: MAC ratios, then one row per image."""
    lines = ["| model | conv MACs x | params x | decomposed |", "|---|---|---|---|"]
    for name, m in result["models"].items():
        lines.append(f"| {name} | {_fmt(m['conv_macs_ratio'], '.2f')} | {_fmt(m['model_params_ratio'], '.2f')} | "
                     f"{m['decomposed']}/{m['conv_layers']} |")
    lines += ["", "| OCR image | lines | identical | char sim | min box IoU | max conf diff | ms orig | ms comp |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in result["ocr"]["images"].items():
        lines.append(
            f"| {name} | {len(r['lines_original'])}/{len(r['lines_compressed'])} | {'yes' if r['text_identical'] else 'NO'} | "
            f"{r['char_similarity']:.3f} | {_fmt(r['min_box_iou'])} | {_fmt(r['max_confidence_diff'])} | "
            f"{_fmt(r['ms_original'], '.0f')} | {_fmt(r['ms_compressed'], '.0f')} |"
        )
    lines += ["", "| detector image | detections | matched | classes equal | min IoU | max score diff | ms orig | ms comp |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in result["detector"]["images"].items():
        lines.append(
            f"| {name} | {len(r['detections_original'])}/{len(r['detections_compressed'])} | {len(r['matched'])} | "
            f"{'yes' if r['classes_equal'] else 'NO'} | {_fmt(r['min_iou'])} | {_fmt(r['max_score_diff'])} | "
            f"{_fmt(r['ms_original'], '.0f')} | {_fmt(r['ms_compressed'], '.0f')} |"
        )
    return "\n".join(lines)


def run(workdir: Path, config, *, repeats: int = 5, ocr_images: Sequence[str] = OCR_IMAGES,
        detector_images: Sequence[str] = DETECTOR_IMAGES) -> dict:
    """Compress the three models with ``config`` into ``workdir`` and compare both clients."""
    import dataclasses

    originals = original_models()
    compressed = compress_for_clients(workdir, config)
    models = {}
    for name, report in load_reports(compressed).items():
        totals = report["totals"]
        models[name] = {
            "original": str(originals[name]),
            "compressed": str(compressed[name]),
            "conv_layers": report["summary"]["conv_candidates"],
            "decomposed": sum(layer["status"] == "decomposed" for layer in report["layers"]),
            "conv_macs_ratio": report["summary"]["conv_macs_ratio"],
            "model_params_ratio": report["summary"]["model_params_ratio"],
            "conv_macs_before": totals["conv_macs_before"],
            "conv_macs_after": totals["conv_macs_after"],
        }
    ocr = ocr_compare(originals["det"], compressed["det"], originals["rec"], compressed["rec"],
                      load_images(ocr_images), repeats=repeats)
    detector = detector_compare(originals["nudenet"], compressed["nudenet"], load_images(detector_images), repeats=repeats)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "config": dataclasses.asdict(config),
        "repeats": repeats,
        "models": models,
        "ocr": ocr,
        "detector": detector,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "clients.json")
    parser.add_argument("--workdir", type=Path, default=ROOT / "out" / "clients", help="where the compressed models go")
    parser.add_argument("--weaken", type=float, default=0.6, help="weakened-VBMF factor w (1 = VBMF, 0 = full rank)")
    parser.add_argument("--round-to", type=int, default=16, help="round ranks up to a multiple of this")
    parser.add_argument("--energy", type=float, default=None,
                        help="use the energy policy (keep this fraction of the squared singular values) instead of --weaken")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per image and model, median reported; 0 = no timing")
    args = parser.parse_args(argv)
    config = client_config(args.weaken, args.round_to, args.energy)
    result = run(args.workdir, config, repeats=args.repeats)
    policy = f"energy {args.energy}" if args.energy is not None else f"weakened w={args.weaken}"
    print(f"{result['date']} on {platform.machine()}, {result['cpus']} cores, Python {platform.python_version()}; "
          f"{policy}, round_to={args.round_to}")
    print(render(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
