"""A folder of images as a :class:`FeedSource`, preprocessed by an :class:`ImageSpec`.

Files
    Recursive; extensions jpg, jpeg, png, bmp, webp (any case); sorted by their path relative to
    the folder, compared part by part. Decoded with Pillow (the ``[images]`` extra), batch by
    batch: a batch's images are in memory only while it is used.
Model
    Exactly one real input, of rank 4: ``N x C x H x W`` (``nchw``) or ``N x H x W x C`` (``nhwc``).
    The layout is inferred from the declared shape (NCHW if dim 1 is 1 or 3, NHWC if the last dim
    is) unless given; C = 1 feeds grayscale (Pillow ``convert("L")``), C = 3 RGB
    (``convert("RGB")``, alpha dropped), reversed to BGR with ``channel_order="bgr"``.
Geometry (to ``size`` = H x W, by default the input's fixed spatial dims)
    Interpolation is Pillow's ``BILINEAR`` (which widens its support when downscaling, i.e.
    antialiases). For an image of ``h x w``:

    * ``stretch``: resize to ``H x W``, ignoring the aspect ratio.
    * ``letterbox``: ``s = min(H/h, W/w)``, resize to ``round(h s) x round(w s)``, pad to ``H x W``
      with the raw pixel value 114 on every channel, centered; of an odd padding the extra row goes
      to the bottom and the extra column to the right.
    * ``short-side+center-crop``: ``s = max(H/h, W/w)``, resize to ``round(h s) x round(w s)``,
      crop ``H x W`` from the center; of an odd excess the extra row is cut from the bottom and
      the extra column from the right.
Values
    ``x = pixel * scale`` (pixels 0..255), then ``(x - mean) / std`` per channel; ``mean`` and
    ``std`` have 1 or C entries, in the channel order fed to the model (after ``channel_order``);
    computed in float64 and cast to the input's element type. Integer inputs (e.g. uint8) take
    raw pixels: ``scale=1`` and no mean/std.
Batches
    ``batch_size`` images, or the input's fixed batch dimension; with a fixed one, images that do
    not fill a last batch are dropped (logged).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxfactor.errors import UsageError, first_line

from .checks import check_feeds
from .signature import InputSignature, check_fits, fmt_declared
from .source import Batch, FeedSource

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
RESIZE_MODES = ("stretch", "letterbox", "short-side+center-crop")
CHANNEL_ORDERS = ("rgb", "bgr")
LAYOUTS = ("nchw", "nhwc")
#: the pad value of ``letterbox``, in raw 0..255 pixel units (YOLO's grey)
LETTERBOX_PAD = 114
_INSTALL = "reading an image folder needs Pillow: pip install 'onnxfactor[images]'"


@dataclass(frozen=True)
class ImageSpec:
    """How images become model input: size, resize mode, value scaling, channel order and layout.

    Attributes
    ----------
    size
        ``(H, W)``; None = the model input's fixed spatial dims (``--image-size HxW``).
    resize
        ``stretch``, ``letterbox`` or ``short-side+center-crop`` (see the module docstring).
    scale
        Pixels (0..255) are multiplied by this first; 1/255 maps them to [0, 1].
    mean, std
        Per channel, 1 or C values, subtracted then divided after scaling; None = 0 and 1.
    channel_order
        ``rgb`` or ``bgr`` (3-channel inputs).
    layout
        ``nchw`` or ``nhwc``; None = inferred from the input's declared shape.
    """

    size: tuple[int, int] | None = None
    resize: str = "stretch"
    scale: float = 1 / 255
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    channel_order: str = "rgb"
    layout: str | None = None

    def __post_init__(self):
        if self.size is not None:
            size = tuple(self.size)
            if len(size) != 2 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in size):
                raise UsageError(f"image size must be two positive integers (H, W), got {self.size!r} (--image-size HxW)")
            object.__setattr__(self, "size", (int(size[0]), int(size[1])))
        if self.resize not in RESIZE_MODES:
            raise UsageError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r} (--resize)")
        if self.channel_order not in CHANNEL_ORDERS:
            raise UsageError(f"channel order must be rgb or bgr, got {self.channel_order!r} (--channel-order)")
        if self.layout is not None and self.layout not in LAYOUTS:
            raise UsageError(f"layout must be nchw or nhwc, got {self.layout!r} (--layout)")
        try:
            scale = float(self.scale)
        except (TypeError, ValueError):
            scale = math.nan
        if not (math.isfinite(scale) and scale > 0):
            raise UsageError(f"scale must be a finite number > 0, got {self.scale!r} (--scale)")
        object.__setattr__(self, "scale", scale)
        for field, flag in (("mean", "--mean"), ("std", "--std")):
            values = getattr(self, field)
            if values is None:
                continue
            values = tuple(float(v) for v in np.atleast_1d(values))
            if not values or not all(math.isfinite(v) for v in values) or (field == "std" and not all(v > 0 for v in values)):
                kind = "positive numbers" if field == "std" else "finite numbers"
                raise UsageError(f"{field} must be 1 or C {kind}, got {getattr(self, field)!r} ({flag})")
            object.__setattr__(self, field, values)


def _parse_floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None or not str(text).strip():
        return None
    try:
        values = tuple(float(p) for p in str(text).split(","))
    except ValueError:
        raise UsageError(f"bad {flag} {text!r}: expected comma-separated numbers, e.g. {flag} 0.485,0.456,0.406") from None
    return values


def _parse_size(text: str | None) -> tuple[int, int] | None:
    if text is None or not str(text).strip():
        return None
    parts = [p.strip() for p in str(text).lower().replace(",", "x").split("x")]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UsageError(f"bad --image-size {text!r}: expected HxW with positive integers, e.g. --image-size 224x224")
    return int(parts[0]), int(parts[1])


def image_spec(image_size=None, resize="stretch", scale=1 / 255, mean=None, std=None, channel_order="rgb", layout=None) -> ImageSpec:
    """An :class:`ImageSpec` from CLI values: ``"HxW"`` (or ``"N"`` for N x N), comma lists, enum or str choices.

    Raises :class:`UsageError` naming the flag of a bad value.
    """
    def value(v):
        return getattr(v, "value", v)

    return ImageSpec(
        size=_parse_size(image_size), resize=value(resize), scale=float(scale),
        mean=_parse_floats(mean, "--mean"), std=_parse_floats(std, "--std"),
        channel_order=value(channel_order), layout=value(layout),
    )


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise UsageError(_INSTALL) from None
    return Image


def list_images(folder: Path) -> list[Path]:
    """The image files below ``folder`` (recursive, see :data:`IMAGE_EXTENSIONS`), sorted by relative path."""
    found = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def _layout(spec: InputSignature, layout: str | None, flag: str) -> tuple[str, int]:
    """(layout, channels) of a rank-4 image input."""
    d = spec.declared
    where = f"input {spec.name!r} declared {fmt_declared(spec.value)}"
    if layout is None:
        nchw, nhwc = d[1] in (1, 3), d[3] in (1, 3)
        if nchw == nhwc:
            why = "both dim 1 and the last dim could be" if nchw else "neither dim 1 nor the last dim is"
            raise UsageError(f"cannot tell the channel axis of {where}: {why} 1 or 3 channels; pass --layout nchw or --layout nhwc")
        layout = "nchw" if nchw else "nhwc"
    channels = d[1] if layout == "nchw" else d[3]
    if channels not in (1, 3):
        got = "dynamic" if channels is None else channels
        raise UsageError(
            f"{where} has {got} channels in layout {layout}; an image folder feeds 1 (grayscale) or 3 (RGB/BGR) "
            f"channels: check --layout or give a data-loader script to {flag}"
        )
    return layout, channels


class ImageFolderSource(FeedSource):
    """The images below a folder, preprocessed by an :class:`ImageSpec` (see the module docstring)."""

    def __init__(
        self,
        folder: Path,
        inputs: list[InputSignature],
        spec: ImageSpec | None = None,
        *,
        max_samples: int | None = None,
        batch_size: int = 64,
        flag: str = "--data",
    ):
        self.folder = Path(folder)
        self.spec = spec = spec or ImageSpec()
        self.flag = flag
        self._image = _pillow()
        if len(inputs) != 1:
            raise UsageError(
                f"an image folder feeds one input, but the model has {len(inputs)}: {', '.join(i.name for i in inputs) or '(none)'}; "
                f"give a data-loader script (file.py:function) or an .npz to {flag}"
            )
        (self.input,) = self.inputs = inputs
        d = self.input.declared
        if d is None or len(d) != 4:
            raise UsageError(
                f"input {self.input.name!r} declared {fmt_declared(self.input.value)} is not an image batch (N, C, H, W or N, H, W, C); "
                f"give a data-loader script or an .npz to {flag}"
            )
        self.layout, self.channels = _layout(self.input, spec.layout, flag)
        declared_hw = (d[2], d[3]) if self.layout == "nchw" else (d[1], d[2])
        if spec.size is not None:
            self.size = spec.size
        elif None in declared_hw:
            raise UsageError(
                f"input {self.input.name!r} declared {fmt_declared(self.input.value)} has dynamic spatial dims; "
                f"set the image size with --image-size HxW"
            )
        else:
            self.size = (int(declared_hw[0]), int(declared_hw[1]))
        h, w = self.size
        shape = (d[0] or 1, self.channels, h, w) if self.layout == "nchw" else (d[0] or 1, h, w, self.channels)
        check_fits(self.input.value, d, shape, what=f"images of {h}x{w} ({self.layout})")
        for field in ("mean", "std"):
            values = getattr(spec, field)
            if values is not None and len(values) not in (1, self.channels):
                raise UsageError(f"--{field} has {len(values)} values but input {self.input.name!r} has {self.channels} channels; give 1 or {self.channels}")
        if self.input.dtype.kind != "f" and (spec.scale != 1 or spec.mean is not None or spec.std is not None):
            raise UsageError(
                f"input {self.input.name!r} is {self.input.dtype}: it takes raw pixels; pass --scale 1 and no --mean/--std"
            )

        if not self.folder.is_dir():
            raise UsageError(f"{flag} folder {str(self.folder)!r} does not exist")
        files = list_images(self.folder)
        if not files:
            raise UsageError(
                f"{flag} folder {str(self.folder)!r} holds no image files ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}, any case, "
                f"searched recursively); add images or give an .npz or a data-loader script"
            )
        if max_samples is not None:
            files = files[:max_samples]
        fixed = self.input.batch_dim
        self.step = fixed or batch_size
        if fixed is not None:
            usable = len(files) - len(files) % fixed
            if usable == 0:
                raise UsageError(f"{self.folder.name}/ has {len(files)} images, fewer than the model's fixed batch dimension {fixed}")
            if usable < len(files):
                log.warning("%s/: dropping the last %d images, which do not fill a batch of %d", self.folder.name, len(files) - usable, fixed)
            files = files[:usable]
        self.files = files
        self._mean = np.asarray(spec.mean if spec.mean is not None else (0.0,), np.float64)
        self._std = np.asarray(spec.std if spec.std is not None else (1.0,), np.float64)

    @property
    def describe(self) -> str:
        h, w = self.size
        return f"images in {self.folder.name}/ ({len(self.files)} files, {self.spec.resize} {h}x{w})"

    @property
    def samples(self) -> int:
        return len(self.files)

    @property
    def paths(self) -> frozenset[Path]:
        return frozenset(p.resolve() for p in self.files)

    @property
    def labels(self) -> None:
        """An image folder carries no labels."""
        return None

    def load(self, path: Path) -> np.ndarray:
        """One image as float64 ``H x W x C`` (channels in the fed order), after geometry and values."""
        Image = self._image
        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.channels == 1 else "RGB")
                pixels = self._geometry(img)
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
            raise UsageError(f"cannot read image {str(path)!r} ({type(e).__name__}: {first_line(e)}); remove or replace the file") from None
        x = pixels.astype(np.float64)
        if x.ndim == 2:
            x = x[:, :, None]
        if self.channels == 3 and self.spec.channel_order == "bgr":
            x = x[:, :, ::-1]
        return (x * self.spec.scale - self._mean) / self._std

    def _geometry(self, img) -> np.ndarray:
        """Resize (and pad or crop) a decoded image to ``size``; uint8 ``H x W [x C]``."""
        Image = self._image
        H, W = self.size
        w, h = img.size
        mode = self.spec.resize
        if mode == "stretch":
            return np.asarray(img.resize((W, H), Image.BILINEAR))
        s = min(H / h, W / w) if mode == "letterbox" else max(H / h, W / w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        if mode == "letterbox":
            nh, nw = min(nh, H), min(nw, W)
            resized = np.asarray(img.resize((nw, nh), Image.BILINEAR))
            out = np.full((H, W, *resized.shape[2:]), LETTERBOX_PAD, np.uint8)
            top, left = (H - nh) // 2, (W - nw) // 2
            out[top:top + nh, left:left + nw] = resized
            return out
        nh, nw = max(nh, H), max(nw, W)
        resized = np.asarray(img.resize((nw, nh), Image.BILINEAR))
        top, left = (nh - H) // 2, (nw - W) // 2
        return resized[top:top + H, left:left + W]

    def batches(self) -> Iterator[Batch]:
        name = self.input.name
        for start in range(0, len(self.files), self.step):
            chunk = self.files[start:start + self.step]
            x = np.stack([self.load(p) for p in chunk])  # N x H x W x C
            if self.layout == "nchw":
                x = x.transpose(0, 3, 1, 2)
            source = f"{self.folder.name}/{chunk[0].relative_to(self.folder).as_posix()}" if len(chunk) == 1 else f"{self.folder.name}/"
            yield check_feeds({name: np.ascontiguousarray(x)}, self.inputs, source=source, start=start)
