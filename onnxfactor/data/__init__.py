"""Model input data for calibration, validation and fine-tuning: one :class:`FeedSource` for every form.

:func:`open_source` takes

* a path (``str`` or ``os.PathLike``): an ``.npz`` file (:mod:`onnxfactor.data.npz`), a folder of
  images (:mod:`onnxfactor.data.images`, preprocessed by an :class:`ImageSpec`) or a data-loader
  script ``file.py[:function]`` (:mod:`onnxfactor.data.script`);
* an existing :class:`FeedSource` (returned as is, limited to ``max_samples``);
* any iterable of feed dicts, or an ONNX Runtime ``CalibrationDataReader``
  (:mod:`onnxfactor.data.iterable`).

Every batch of every source passes the same checks (:mod:`onnxfactor.data.checks`: keys, dtypes,
NaN / infinities, integer values, shapes, labels); :func:`check_disjoint` refuses calibration and
validation data that share a file or a sample (:mod:`onnxfactor.data.overlap`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import onnx

from onnxfactor.errors import UsageError

from .checks import check_feeds
from .images import IMAGE_EXTENSIONS, ImageFolderSource, ImageSpec, image_spec
from .iterable import IterableSource
from .npz import NpzSource
from .overlap import check_disjoint, check_disjoint_data, sample_digests
from .script import ScriptSource, parse_script
from .signature import signature
from .source import Batch, FeedSource, LimitedSource, role_flags

log = logging.getLogger(__name__)

__all__ = [
    "Batch",
    "FeedSource",
    "ImageSpec",
    "check_data_exists",
    "check_disjoint",
    "check_disjoint_data",
    "check_feeds",
    "image_spec",
    "open_source",
    "sample_digests",
]


def _is_path(data: Any) -> bool:
    return isinstance(data, (str, os.PathLike))


def check_data_exists(data: Any, *, role: str = "validation") -> None:
    """Fail early, before any heavy work, on a data path that does not exist (a script: its file).

    Anything that is not a path is left to :func:`open_source`.
    """
    if data is None or not _is_path(data):
        return
    flag, _ = role_flags(role)
    text = os.fspath(data)
    script = parse_script(str(text))
    path = script[0] if script is not None else Path(text)
    if not path.exists():
        kind = "script" if script is not None else "file or folder"
        raise UsageError(f"{role} data {kind} not found: {path} ({flag})")


def open_source(
    data: Any,
    model: onnx.ModelProto,
    *,
    images: ImageSpec | None = None,
    max_samples: int | None = None,
    batch_size: int = 64,
    role: str = "calibration",
) -> FeedSource:
    """The :class:`FeedSource` for ``data`` (see the module docstring), checked against ``model``'s inputs.

    Parameters
    ----------
    data
        A path to an ``.npz`` file, an image folder or a script ``file.py[:function]``; a
        :class:`FeedSource`; an iterable of feed dicts; or a ``CalibrationDataReader``.
    model
        The model whose real inputs (graph inputs without initializer) are fed.
    images
        How an image folder is preprocessed; None = :class:`ImageSpec` defaults. Ignored (with a
        warning when not the defaults) for other data.
    max_samples
        Read at most this many samples.
    batch_size
        Samples per batch for ``.npz`` files and image folders whose model input has a dynamic
        batch dimension (a fixed one wins); scripts and iterables give their own batches.
    role
        ``"calibration"`` or ``"validation"``: names the flag in messages (``--calibration`` /
        ``--data``, ``--calibration-samples`` / ``--max-samples``).

    Raises
    ------
    UsageError
        For missing or unreadable data, data that does not fit the model, or bad options.
    """
    flag, count_flag = role_flags(role)
    if max_samples is not None and (isinstance(max_samples, bool) or int(max_samples) != max_samples or max_samples < 1):
        raise UsageError(f"{count_flag} must be a positive integer, got {max_samples}")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise UsageError(f"batch size must be a positive integer, got {batch_size}")
    if isinstance(data, FeedSource):
        return data if max_samples is None else LimitedSource(data, max_samples, signature(model), flag=count_flag)
    inputs = signature(model)
    folder = _is_path(data) and parse_script(os.fspath(data)) is None and Path(data).is_dir()
    if images is not None and images != ImageSpec() and not folder:
        log.warning("image options are ignored: %s data %s is not an image folder", role, data if _is_path(data) else type(data).__name__)
    if _is_path(data):
        text = os.fspath(data)
        script = parse_script(str(text))
        if script is not None:
            source: FeedSource = ScriptSource(script[0], script[1], inputs, flag=flag)
        elif folder:
            return ImageFolderSource(Path(text), inputs, images, max_samples=max_samples, batch_size=batch_size, flag=flag)
        elif Path(text).suffix.lower() in IMAGE_EXTENSIONS:
            raise UsageError(f"{flag} {text} is one image; give the folder that holds the images")
        else:
            return NpzSource(Path(text), inputs, max_samples=max_samples, batch_size=batch_size, flag=flag)
    else:
        source = IterableSource(data, inputs, fix=flag)
    return source if max_samples is None else LimitedSource(source, max_samples, inputs, flag=count_flag)
