"""Refuse fitting and validating on the same samples: shared files, then shared sample contents.

Accuracy measured on the samples the factors were fitted to is accuracy you will not see on new
data, so :func:`check_disjoint` fails unless the calibration and validation data share no file
(same resolved path, or the same file through another link: ``os.path.samefile``; a data-loader
script itself does not count, two of its functions may load disjoint data) and no sample.
A sample's identity is the SHA-1 of its row of every per-sample feed after casting, in input-name
order, plus the feeds fed whole in every batch (0-d and ``__broadcast__`` arrays); labels are not
part of it. Both sources are read once in full to compute the digests.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from onnxfactor.errors import UsageError

from .source import FeedSource

_FIX = "use disjoint data or pass --allow-overlap"


def _update(h, name: str, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    h.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
    h.update(array.tobytes())


def sample_digests(source: FeedSource) -> dict[bytes, int]:
    """SHA-1 digest of every sample of ``source`` -> the global index of its first occurrence."""
    digests: dict[bytes, int] = {}
    for batch in source.batches():
        names = sorted(batch.feeds)
        whole = hashlib.sha1()
        for name in names:
            if name not in batch.per_sample:
                _update(whole, name, batch.feeds[name])
        for i in range(batch.size):
            h = whole.copy()
            for name in names:
                if name in batch.per_sample:
                    _update(h, name, batch.feeds[name][i])
            digests.setdefault(h.digest(), batch.start + i)
    return digests


def _identities(paths: frozenset[Path]) -> dict[tuple[int, int], Path]:
    out = {}
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        out[(st.st_dev, st.st_ino)] = p
    return out


def shared_file(a: FeedSource, b: FeedSource) -> tuple[Path, Path] | None:
    """A file both sources read (the same path or, through a link, the same file), or None."""
    paths_a, paths_b = a.paths - a.code_paths, b.paths - b.code_paths
    common = sorted(paths_a & paths_b)
    if common:
        return common[0], common[0]
    ids_b = _identities(paths_b)
    for key, p in sorted(_identities(paths_a).items(), key=lambda kv: kv[1]):
        if key in ids_b:
            return p, ids_b[key]
    return None


def check_disjoint(calibration: FeedSource, validation: FeedSource) -> None:
    """Raise :class:`UsageError` unless the two sources share no file and no sample.

    Parameters
    ----------
    calibration, validation
        The data the factors are fitted to, and the data the result is validated on.
    """
    shared = shared_file(calibration, validation)
    if shared is not None:
        a, b = shared
        same = str(a) if a == b else f"{a} (validation: {b})"
        raise UsageError(
            f"calibration and validation data share the file {same}; fitting and validating on the same samples "
            f"reports accuracy you will not see: {_FIX}"
        )
    digests_a = sample_digests(calibration)
    digests_b = sample_digests(validation)
    common = digests_a.keys() & digests_b.keys()
    if common:
        first = min(common, key=lambda d: (digests_a[d], digests_b[d]))
        raise UsageError(
            f"calibration and validation data share {len(common)} sample{'s' if len(common) != 1 else ''} "
            f"(e.g. calibration sample {digests_a[first]} = validation sample {digests_b[first]}); fitting and validating "
            f"on the same samples reports accuracy you will not see: {_FIX}"
        )


def check_disjoint_data(model, calibration, validation, *, images=None, samples: int | None = None,
                        validation_images=None, validation_samples: int | None = None) -> None:
    """:func:`check_disjoint` of calibration (or fine-tuning) and validation data in any form
    :func:`onnxfactor.data.open_source` takes, for ``model``'s inputs."""
    from onnxfactor.data import open_source

    fit = open_source(calibration, model, images=images, max_samples=samples, role="calibration")
    held = open_source(validation, model, images=validation_images, max_samples=validation_samples, role="validation")
    check_disjoint(fit, held)
