#!/usr/bin/env python3
"""Calibration data for the real client models, as onnxfactor data-loader scripts.

None of these images is an evaluation photo of ``tools/clients.py`` (OCR: ``page``, ``text``,
``coins``; detector: ``astronaut``, ``camera``, ``chelsea``, and ``cat``, which is ``chelsea``):

* **photos**: random crops (40-100 % of each side, random horizontal flips, seeded) of the other
  ``skimage.data`` photos bundled in its wheel, 40 faces of ``skimage.data.lfw_subset()``
  (Labeled Faces in the Wild) and matplotlib's ``grace_hopper.jpg``;
* **text pages**: lines of English text (from Python's ``this`` module and this tool's own
  vocabulary, shuffled) rendered with DejaVu Sans / Serif / Mono (matplotlib's copies) at
  random sizes, grey levels and small offsets, on plain and noisy backgrounds.

The model inputs are made by the engines' own preprocessing, so the calibration sees exactly
what the deployed model sees: NudeNet's ``_read_image`` (pad to a square, resize to 320, /255,
BGR -> RGB) and RapidOCR's pipeline, whose detector and recogniser inputs are recorded while the
original engine reads the pages (so the recogniser sees the crops the detector really makes).

Use them with ``--calibration tools/calibration_sets.py:nudenet`` (``:ppocr_det``, ``:ppocr_rec``);
``COUNT`` images each (``ONNXFACTOR_CALIB_COUNT`` overrides). The images are cached under
``out/calibration_images/``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COUNT = int(os.environ.get("ONNXFACTOR_CALIB_COUNT", "256"))
CACHE = ROOT / "out" / "calibration_images"
#: skimage.data photos never used for evaluation (the evaluation ones and "cat" = "chelsea" left out)
PHOTOS = ("coffee", "rocket", "horse", "immunohistochemistry", "hubble_deep_field", "retina", "colorwheel", "brick",
          "grass", "gravel", "cell", "clock", "moon", "logo", "stereo_motorcycle")
EVALUATION = ("page", "text", "coins", "astronaut", "camera", "chelsea", "cat")
_WORDS = ("model layer tensor factor rank speed memory accuracy image photo text line page word number value "
          "compress measure validate kernel channel output input batch sample engine runtime graph node weight "
          "December Monday invoice total amount paid order street city phone email price 2026 1984 42 7.50 "
          "Hello World Python Open Source Library Report Chapter Section Figure Table Summary Result").split()


def _as_rgb_uint8(a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.shape[-1] == 4:
        a = a[..., :3]
    if a.dtype != np.uint8:
        lo, hi = float(a.min()), float(a.max())
        a = (255 * (a - lo) / max(hi - lo, 1e-9)).astype(np.uint8)
    return a


def _sources(faces: slice = slice(0, 40)) -> list[tuple[str, np.ndarray]]:
    import matplotlib
    import skimage.data
    from PIL import Image

    images = []
    for name in PHOTOS:
        assert name not in EVALUATION
        a = getattr(skimage.data, name)()
        images.append((name, _as_rgb_uint8(a[0] if name == "stereo_motorcycle" else a)))
    for k, face in enumerate(skimage.data.lfw_subset()[faces]):
        images.append((f"lfw{k + (faces.start or 0)}", _as_rgb_uint8(face)))
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    images.append(("grace_hopper", np.asarray(Image.open(hopper).convert("RGB"))))
    return images


def photos(count: int = COUNT, seed: int = 0) -> Path:
    """A folder of ``count`` JPEG crops of the non-evaluation photos (made once, then cached).

    ``seed`` 0 (calibration) crops the faces ``lfw_subset()[:40]``; any other seed (selection sets,
    :func:`nudenet_selection`) the faces ``[40:80]``, so the two share no face."""
    from PIL import Image

    folder = CACHE / f"photos_{count}_{seed}"
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    sources = _sources(slice(0, 40) if seed == 0 else slice(40, 80))
    rng = np.random.default_rng(seed)
    for i in range(count):
        name, a = sources[rng.integers(len(sources))]
        h, w = a.shape[:2]
        s = rng.uniform(0.4, 1.0)
        ch, cw = max(8, int(h * s)), max(8, int(w * s))
        y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = a[y0 : y0 + ch, x0 : x0 + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"{i:04d}_{name}.jpg", quality=92)
    return folder


def _fonts() -> list[Path]:
    import matplotlib

    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return [ttf / n for n in ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf")]


def _sentences(rng) -> list[str]:
    import codecs
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # importing ``this`` prints the Zen of Python
        import this
    zen = codecs.decode(this.s, "rot13").splitlines()[2:]
    words = list(_WORDS)
    made = [" ".join(rng.choice(words, size=rng.integers(2, 7))) for _ in range(60)]
    return [s for s in zen if s] + made


def text_pages(count: int = COUNT, seed: int = 0) -> Path:
    """A folder of ``count`` PNG pages of rendered text lines (made once, then cached)."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    folder = CACHE / f"text_{count}_{seed}"
    if folder.is_dir() and len(list(folder.glob("*.png"))) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    fonts, sentences = _fonts(), _sentences(rng)
    for i in range(count):
        w, h = 640, 480  # one size: the detector's inputs are then all 992 x 736
        bg = int(rng.integers(200, 256))
        page = Image.new("RGB", (w, h), (bg, bg, bg))
        if rng.random() < 0.3:  # a noisy, photo-like background
            noise = rng.normal(bg, 12, (h, w, 3)).clip(0, 255).astype(np.uint8)
            page = Image.fromarray(noise)
        draw = ImageDraw.Draw(page)
        y = int(rng.integers(5, 30))
        while y < h - 30:
            size = int(rng.integers(14, 40))
            font = ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), size)
            ink = int(rng.integers(0, 90))
            draw.text((int(rng.integers(5, 60)), y), str(rng.choice(sentences)), fill=(ink, ink, ink), font=font)
            y += int(size * rng.uniform(1.3, 2.2))
        if rng.random() < 0.3:
            page = page.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
        page.save(folder / f"{i:04d}.png")
    return folder


def _bgr(path: Path) -> np.ndarray:
    import cv2

    return cv2.imread(str(path))


def nudenet(count: int = COUNT, seed: int = 0):
    """NudeNet 320n inputs (``images``: 1 x 3 x 320 x 320) of the photo crops, by NudeNet's own preprocessing."""
    from nudenet.nudenet import _read_image

    for path in sorted(photos(count, seed).glob("*.jpg")):
        blob = _read_image(str(path), 320)[0]
        yield {"images": np.ascontiguousarray(blob, dtype=np.float32)}


#: samples of the selection sets (the held-out ``--data`` of ``onnxfactor search``)
SELECTION = int(os.environ.get("ONNXFACTOR_SELECTION_COUNT", "128"))


def nudenet_selection():
    """Held-out NudeNet inputs for choosing a model (``search --data``): other crops, other faces (seed 1)."""
    yield from nudenet(SELECTION, seed=1)


class _Recorder:
    """Stands in for a RapidOCR ``OrtInferSession``: records every input, then runs the real one."""

    def __init__(self, session):
        self.session, self.inputs = session, []

    def __call__(self, x):
        self.inputs.append(np.ascontiguousarray(x, dtype=np.float32))
        return self.session(x)

    def __getattr__(self, name):
        return getattr(self.session, name)


def _recorded_ppocr(kind: str, count: int = COUNT, seed: int = 0):
    """Run the original RapidOCR engine on text pages (and some photos) and yield the det or rec inputs it fed."""
    from rapidocr_onnxruntime import RapidOCR

    engine = RapidOCR()
    if kind == "det":
        recorder = engine.text_det.infer = _Recorder(engine.text_det.infer)
    else:
        recorder = engine.text_rec.session = _Recorder(engine.text_rec.session)
    pages = sorted(text_pages(count, seed).glob("*.png"))
    extra = sorted(photos(max(8, count // 8), seed).glob("*.jpg"))
    for path in pages + extra:
        engine(_bgr(path))
        while recorder.inputs:
            yield {"x": recorder.inputs.pop(0)}


def ppocr_det():
    """PP-OCRv4 det inputs (``x``: 1 x 3 x H x W, H and W multiples of 32) of the text pages."""
    yield from _recorded_ppocr("det")


def ppocr_rec():
    """PP-OCRv4 rec inputs (``x``: n x 3 x 48 x W) of the text lines the detector finds on the pages."""
    yield from _recorded_ppocr("rec")


def ppocr_det_selection():
    """Held-out PP-OCRv4 det inputs (``search --data``): other pages and crops (seed 1)."""
    yield from _recorded_ppocr("det", max(8, SELECTION // 4), seed=1)


def ppocr_rec_selection():
    """Held-out PP-OCRv4 rec inputs (``search --data``): the lines of other pages (seed 1)."""
    yield from _recorded_ppocr("rec", max(8, SELECTION // 4), seed=1)


if __name__ == "__main__":
    for name, fn in (("nudenet", nudenet), ("ppocr_det", ppocr_det), ("ppocr_rec", ppocr_rec)):
        shapes = [tuple(next(iter(f.values())).shape) for f in fn()]
        print(name, len(shapes), "batches; first shapes", shapes[:3])
