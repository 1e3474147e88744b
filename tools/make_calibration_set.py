#!/usr/bin/env python3
"""Write the calibration set of the bundled Fashion-MNIST models: ``models/fashion_mnist_calib.npz``.

1000 images drawn without replacement from the 60 000 TRAIN images of Debian's
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``) with
``numpy.random.default_rng(0)``, in sorted index order, normalised exactly like
``models/fashion_mnist_test.npz`` (``tools/train_fashion_mnist.normalise``: ``(x/255 - 0.2860) / 0.3530``,
float32 ``[N, 1, 28, 28]``). Keys: ``input``, ``labels`` (int64), ``indices`` (int64, the train
indices). A small ``models/fashion_mnist_calib.json`` records source, split, count, seed and
normalisation. The images come from the train split and the bundled test images from the test
split, so the two are disjoint by construction; this script also checks it, sample by sample, with
``onnxfactor.data.check_disjoint``::

    python tools/make_calibration_set.py              # writes models/fashion_mnist_calib.{npz,json}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `tools` and `onnxfactor` importable
    sys.path.insert(0, str(ROOT))

from tools.train_fashion_mnist import MEAN, STD, normalise, read_idx_gz  # noqa: E402

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
MODELS = ROOT / "models"
COUNT = 1000
SEED = 0


def make(data_dir: Path = DATA_DIR, count: int = COUNT, seed: int = SEED) -> dict[str, np.ndarray]:
    """The calibration arrays: ``input`` float32 [count, 1, 28, 28], ``labels`` and ``indices`` int64 [count]."""
    images = read_idx_gz(data_dir / "train-images-idx3-ubyte.gz")
    labels = read_idx_gz(data_dir / "train-labels-idx1-ubyte.gz")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} train images but {len(labels)} labels in {data_dir}")
    indices = np.sort(np.random.default_rng(seed).choice(len(images), size=count, replace=False)).astype(np.int64)
    return {"input": normalise(images[indices]), "labels": labels[indices].astype(np.int64), "indices": indices}


def check_disjoint_from_test(calib: Path, test: Path, model: Path) -> None:
    """Raise unless no sample of ``calib`` equals one of ``test`` (onnxfactor's overlap rule)."""
    import onnx

    from onnxfactor.data import check_disjoint, open_source

    m = onnx.load(str(model), load_external_data=False)
    check_disjoint(open_source(str(calib), m, role="calibration"), open_source(str(test), m, role="validation"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=DATA_DIR, help=f"Fashion-MNIST idx .gz files (default {DATA_DIR})")
    p.add_argument("--out", type=Path, default=MODELS / "fashion_mnist_calib.npz", help="the .npz to write (a .json is written next to it)")
    p.add_argument("--count", type=int, default=COUNT, help=f"images to draw (default {COUNT})")
    p.add_argument("--seed", type=int, default=SEED, help=f"numpy.random.default_rng seed (default {SEED})")
    args = p.parse_args(argv)

    arrays = make(args.data_dir, args.count, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    meta = {
        "source": "Fashion-MNIST (Debian dataset-fashion-mnist), " + str(args.data_dir / "train-images-idx3-ubyte.gz"),
        "split": "train",
        "count": int(args.count),
        "seed": int(args.seed),
        "sampling": "numpy.random.default_rng(seed).choice(60000, count, replace=False), sorted",
        "normalisation": f"(x / 255 - {MEAN}) / {STD}, float32 [N, 1, 28, 28] (as fashion_mnist_test.npz)",
        "keys": {"input": "float32 [N, 1, 28, 28]", "labels": "int64 [N]", "indices": "int64 [N], train-split indices"},
        "class_counts": np.bincount(arrays["labels"], minlength=10).tolist(),
    }
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    test = MODELS / "fashion_mnist_test.npz"
    if test.is_file():
        check_disjoint_from_test(args.out, test, MODELS / "fashion_cnn.onnx")
        print(f"checked: no sample of {args.out.name} is in {test.name}")
    print(f"wrote {args.out} ({args.count} train images, seed {args.seed}) and {args.out.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
