#!/usr/bin/env python3
"""Train the bundled Fashion-MNIST CNNs and export them to ONNX.

This is the (re-runnable) recipe for the real models shipped in ``models/``.
``--arch`` picks the network:

* ``small`` (default): compact VGG-style CNN, 32-32-M-64-64-M-128-128-M, Adam,
  no weight decay.  Nearly full-rank filters (flat spectra).  Written as
  ``models/fashion_cnn.{onnx,json}``.
* ``wide``: wider VGG-style CNN, 64-64-M-128-128-M-256-256-M, trained with
  weight decay (AdamW, or SGD + momentum with ``--optimizer sgd``): the usual
  over-parameterised recipe of deployed CNNs, whose filters are much more
  redundant.  Written as ``models/fashion_vgg_wide.{onnx,json}``.

``--out-name`` overrides the file stem.  Outputs:

* ``models/<name>.onnx``             opset 17, input ``input`` float32
  ``[batch, 1, 28, 28]`` (already normalised), output ``logits``
  ``[batch, 10]``.  BatchNorm is folded into the preceding Conv before export,
  so every Conv carries a bias and the graph is only
  Conv / Relu / MaxPool / Flatten / Gemm.
* ``models/fashion_mnist_test.npz``  the first ``--n-test-npz`` images of the
  official Fashion-MNIST test set, normalised exactly as the model expects
  (``input`` float32 ``[N, 1, 28, 28]``) with their ``labels`` (int64 ``[N]``).
  Shared by all models: when it already exists with exactly the content that
  would be written it is left untouched; when its content differs the script
  stops before training unless ``--overwrite-npz`` is given.
* ``models/<name>.json``             metadata: architecture, training setup,
  training time, and test accuracies measured with onnxruntime on the
  exported file.

The data come from Debian's ``dataset-fashion-mnist`` package
(``apt-get install dataset-fashion-mnist``), which installs the original idx
``.gz`` files in ``/usr/share/datasets/fashion-mnist/``.  They are read with
gzip + numpy only (no torchvision).

torch is needed only here (``pip install torch``); the ``onnxfactor`` package
itself never imports it.  Training runs on the CPU with a single thread so the
result is reproducible for a fixed ``--seed`` on a given machine.  Where the CPU
has AMX / AVX512-BF16 the forward and backward passes run under bfloat16
autocast (about 2x faster; weights stay fp32 and the export is fp32)::

    python tools/train_fashion_mnist.py --epochs 6 --seed 0                  # small (~11 min)
    python tools/train_fashion_mnist.py --arch wide --epochs 4 --seed 0       # wide (~16 min)
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np

MEAN = 0.2860
STD = 0.3530
CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
OPSET = 17
NPZ_NAME = "fashion_mnist_test.npz"


def _describe(widths: tuple[int, ...], hidden: int, dropout: float) -> str:
    """Human-readable architecture string for the JSON metadata."""
    parts = []
    cin = 1
    for stage in range(0, len(widths), 2):
        a, b = widths[stage], widths[stage + 1]
        part = (f"conv3x3({cin}->{a},pad1) BN ReLU, conv3x3({a}->{b},pad1) BN ReLU, maxpool2")
        cin = b
        parts.append(part)
    flat = cin * 3 * 3
    return (
        "; ".join(parts) + f" (-> {cin}x3x3); "
        f"flatten, linear({flat}->{hidden}) ReLU, dropout {dropout}, linear({hidden}->10). "
        "BatchNorm folded into the convs in the exported ONNX (Conv with bias), dropout removed."
    )


# Per-architecture settings.  ``small`` must keep reproducing models/fashion_cnn.*
# with the defaults (Adam lr 1e-3, no weight decay).
ARCHS = {
    "small": {
        "widths": (32, 32, 64, 64, 128, 128),
        "hidden": 256,
        "dropout": 0.3,
        "out_name": "fashion_cnn",
        "optimizer": "adam",
        "lr": {"adam": 1e-3, "adamw": 1e-3, "sgd": 0.05},
        "weight_decay": 0.0,
    },
    "wide": {
        "widths": (64, 64, 128, 128, 256, 256),
        "hidden": 256,
        "dropout": 0.3,
        "out_name": "fashion_vgg_wide",
        "optimizer": "adamw",
        "lr": {"adam": 1e-3, "adamw": 1e-3, "sgd": 0.05},
        "weight_decay": 5e-4,
    },
}
for _cfg in ARCHS.values():
    _cfg["description"] = _describe(_cfg["widths"], _cfg["hidden"], _cfg["dropout"])
ARCHITECTURE = ARCHS["small"]["description"]  # backwards-compatible name


# --------------------------------------------------------------------------- data


def read_idx_gz(path: Path) -> np.ndarray:
    """Read an idx (ubyte) file compressed with gzip into a numpy array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an idx file")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: unsupported idx dtype 0x{dtype_code:02x} (expected ubyte)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    data = np.frombuffer(raw, dtype=np.uint8, offset=offset)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {np.prod(dims)} values, found {data.size}")
    return data.reshape(dims)


def normalise(images_u8: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28], (x/255 - mean) / std."""
    x = images_u8.astype(np.float32) / np.float32(255.0)
    x = (x - np.float32(MEAN)) / np.float32(STD)
    return np.ascontiguousarray(x[:, None, :, :], dtype=np.float32)


def load_split(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images = read_idx_gz(data_dir / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx_gz(data_dir / f"{prefix}-labels-idx1-ubyte.gz")
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise ValueError(f"unexpected {split} shapes {images.shape} / {labels.shape}")
    return normalise(images), labels.astype(np.int64)


# --------------------------------------------------------------------------- model


def build_model(torch, arch: str = "small"):
    """VGG-style CNN: three stages of two (conv3x3 BN ReLU) blocks + maxpool, then a 2-layer MLP.

    The layer order (and hence parameter initialisation order) of ``small`` is
    unchanged from the original recipe, so a fixed seed reproduces the same model.
    """
    nn = torch.nn
    cfg = ARCHS[arch]
    widths, hidden, dropout = cfg["widths"], cfg["hidden"], cfg["dropout"]

    def block(cin: int, cout: int) -> list:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    layers: list = []
    cin = 1
    for stage in range(0, len(widths), 2):
        a, b = widths[stage], widths[stage + 1]
        layers += [*block(cin, a), *block(a, b), nn.MaxPool2d(2)]
        cin = b
    return nn.Sequential(
        *layers,
        nn.Flatten(),
        nn.Linear(cin * 3 * 3, hidden), nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, 10),
    )


def make_optimizer(torch, params, name: str, lr: float, weight_decay: float):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def describe_optimizer(name: str, lr: float, weight_decay: float) -> str:
    label = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD momentum 0.9 (Nesterov)"}[name]
    wd = "" if weight_decay == 0 else f" weight_decay {weight_decay:g}"
    return f"{label} lr {lr:g}{wd} with cosine annealing per step; random horizontal flip"


def check_npz(path: Path, x: np.ndarray, y: np.ndarray) -> str:
    """Compare an existing test npz with the arrays that would be written.

    Returns ``"missing"``, ``"identical"`` or a short description of the difference.
    """
    if not path.exists():
        return "missing"
    try:
        with np.load(path) as z:
            keys = sorted(z.files)
            if keys != ["input", "labels"]:
                return f"keys {keys}"
            xi, yl = z["input"], z["labels"]
    except Exception as exc:  # corrupt / unreadable file
        return f"unreadable ({exc})"
    if xi.dtype != x.dtype or xi.shape != x.shape or yl.dtype != y.dtype or yl.shape != y.shape:
        return f"input {xi.dtype}{list(xi.shape)} labels {yl.dtype}{list(yl.shape)}"
    if not np.array_equal(xi, x) or not np.array_equal(yl, y):
        return "different values"
    return "identical"


def fold_for_export(torch, model):
    """Return an eval-mode copy with each BatchNorm folded into its Conv and no Dropout."""
    nn = torch.nn
    layers = list(model.eval())
    out = []
    i = 0
    with torch.no_grad():
        while i < len(layers):
            layer = layers[i]
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(layer, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d):
                bn = nxt
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                conv = nn.Conv2d(
                    layer.in_channels, layer.out_channels, layer.kernel_size,
                    stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                    groups=layer.groups, bias=True,
                )
                conv.weight.copy_(layer.weight * scale.reshape(-1, 1, 1, 1))
                bias0 = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
                conv.bias.copy_(bn.bias + (bias0 - bn.running_mean) * scale)
                out.append(conv)
                i += 2
                continue
            if isinstance(layer, nn.Dropout):
                i += 1
                continue
            if isinstance(layer, nn.ReLU):
                out.append(nn.ReLU())
            else:
                out.append(layer)
            i += 1
    return nn.Sequential(*out).eval()


# --------------------------------------------------------------------------- eval


def cpu_has_bf16() -> bool:
    """True when the CPU has native bfloat16 matmul support (AMX or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def onnx_accuracy(session, x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    correct = 0
    for s in range(0, len(x), batch):
        logits = session.run(["logits"], {"input": x[s:s + batch]})[0]
        correct += int((logits.argmax(axis=1) == y[s:s + batch]).sum())
    return correct / len(x)


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="small",
                   help="network: 'small' 32-32-64-64-128-128 (default, models/fashion_cnn.*) or "
                        "'wide' 64-64-128-128-256-256 trained with weight decay "
                        "(models/fashion_vgg_wide.*)")
    p.add_argument("--out-name", default=None,
                   help="file stem of the .onnx/.json outputs (default: fashion_cnn for --arch small, "
                        "fashion_vgg_wide for --arch wide)")
    p.add_argument("--epochs", type=int, default=6, help="training epochs (default 6)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out-dir", type=Path, default=Path("models"), help="output folder (default models)")
    p.add_argument("--data-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                   help="folder holding the Fashion-MNIST idx .gz files")
    p.add_argument("--n-test-npz", type=int, default=1000,
                   help="number of leading test images saved to fashion_mnist_test.npz (default 1000)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], default=None,
                   help="default: adam for small, adamw for wide")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 1e-3 for adam/adamw, 0.05 for sgd)")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="weight decay (default 0 for small, 5e-4 for wide)")
    p.add_argument("--overwrite-npz", action="store_true",
                   help=f"rewrite {NPZ_NAME} even when an existing one has different content")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bfloat16 autocast for training (fp32 master weights; the exported model is "
                        "fp32). 'auto' = on when the CPU has AMX or AVX512-BF16 (default auto)")
    args = p.parse_args(argv)
    cfg = ARCHS[args.arch]
    if args.out_name is None:
        args.out_name = cfg["out_name"]
    if args.optimizer is None:
        args.optimizer = cfg["optimizer"]
    if args.lr is None:
        args.lr = cfg["lr"][args.optimizer]
    if args.weight_decay is None:
        args.weight_decay = cfg["weight_decay"]
    if not args.out_name or "/" in args.out_name or args.out_name.endswith((".onnx", ".json")):
        p.error("--out-name is a bare file stem, e.g. fashion_vgg_wide")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    import torch  # only this tool needs torch
    import onnx
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    use_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and cpu_has_bf16())
    print(f"torch {torch.__version__}, {args.threads} thread(s), bf16 autocast: {use_bf16}", flush=True)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    x_train, y_train = load_split(args.data_dir, "train")
    x_test, y_test = load_split(args.data_dir, "test")
    print(f"train {x_train.shape}, test {x_test.shape}", flush=True)

    # The test npz is shared by every model: check it before spending time on training.
    n = args.n_test_npz
    npz_path = args.out_dir / NPZ_NAME
    npz_x, npz_y = x_test[:n].astype(np.float32), y_test[:n].astype(np.int64)
    npz_state = check_npz(npz_path, npz_x, npz_y)
    if npz_state not in ("missing", "identical") and not args.overwrite_npz:
        print(f"error: {npz_path} exists with different content ({npz_state}); "
              f"pass --overwrite-npz to replace it", file=sys.stderr)
        return 2
    print(f"arch {args.arch}, outputs {args.out_dir / args.out_name}.onnx/.json, "
          f"{npz_path}: {npz_state}", flush=True)

    model = build_model(torch, args.arch).to(memory_format=torch.channels_last)
    opt = make_optimizer(torch, model.parameters(), args.optimizer, args.lr, args.weight_decay)
    steps_per_epoch = (len(x_train) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)
    loss_fn = torch.nn.CrossEntropyLoss()

    xt_all = torch.from_numpy(x_train)
    yt_all = torch.from_numpy(y_train)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        te = time.perf_counter()
        perm = rng.permutation(len(x_train))
        total_loss = 0.0
        for s in range(0, len(perm), args.batch_size):
            idx = torch.from_numpy(perm[s:s + args.batch_size])
            xb = xt_all[idx].contiguous(memory_format=torch.channels_last)
            yb = yt_all[idx]
            # light augmentation: random horizontal flip of half the batch
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
            if bool(flip.any()):
                xb[flip] = xb[flip].flip(-1)
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.detach().item() * len(idx)
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            pred = torch.cat([model(torch.from_numpy(x_test[s:s + 1000])).argmax(1)
                              for s in range(0, len(x_test), 1000)]).numpy()
        acc = float((pred == y_test).mean())
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total_loss / len(perm):.4f}, "
              f"torch test acc {acc:.4f}{' (bf16)' if use_bf16 else ''}, "
              f"{time.perf_counter() - te:.1f}s", flush=True)
    train_seconds = time.perf_counter() - t0
    print(f"training took {train_seconds:.1f}s", flush=True)

    # ---- fold BN, check, export
    model = model.eval().to(memory_format=torch.contiguous_format).float()
    deploy = fold_for_export(torch, model)
    check = torch.from_numpy(x_test[:256])
    with torch.no_grad():
        ref = model(check).numpy()
        folded = deploy(check).numpy()
    print(f"BN folding max abs diff: {np.abs(ref - folded).max():.2e}")
    assert np.abs(ref - folded).max() < 1e-4, "BatchNorm folding changed the outputs"

    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out_dir / f"{args.out_name}.onnx"
    torch.onnx.export(
        deploy, (torch.from_numpy(x_test[:2]),), str(onnx_path),
        dynamo=False, opset_version=OPSET,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    proto = onnx.load(str(onnx_path), load_external_data=False)
    onnx.checker.check_model(proto)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer), \
        "exported model uses external data"
    assert all(o.version == OPSET for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    op_counts: dict[str, int] = {}
    for node in proto.graph.node:
        op_counts[node.op_type] = op_counts.get(node.op_type, 0) + 1
    print(f"exported {onnx_path} ({onnx_path.stat().st_size} bytes), ops {op_counts}")

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    onnx_out = sess.run(["logits"], {"input": x_test[:256]})[0]
    max_diff = float(np.abs(onnx_out - ref).max())
    print(f"ONNX vs torch max abs diff: {max_diff:.2e}")
    assert max_diff < 1e-4, f"ONNX logits differ from torch by {max_diff}"

    # ---- test subset npz (shared; rewritten only when missing or explicitly overwritten)
    if check_npz(npz_path, npz_x, npz_y) == "identical":
        print(f"{npz_path} already holds the same {n} images, left unchanged")
    else:
        np.savez_compressed(npz_path, input=npz_x, labels=npz_y)
        print(f"wrote {npz_path}")

    with np.load(npz_path) as z:
        acc_npz = onnx_accuracy(sess, z["input"], z["labels"])
    acc_10k = onnx_accuracy(sess, x_test, y_test)
    print(f"onnxruntime accuracy: full test set {acc_10k:.4f}, npz ({n}) {acc_npz:.4f}")

    meta = {
        "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist)",
        "architecture": ARCHS[args.arch]["description"],
        "input": {"name": "input", "dtype": "float32", "shape": ["batch", 1, 28, 28]},
        "output": {"name": "logits", "dtype": "float32", "shape": ["batch", 10]},
        "epochs": args.epochs,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "optimizer": describe_optimizer(args.optimizer, args.lr, args.weight_decay),
        "bf16_autocast_training": use_bf16,
        "torch_threads": args.threads,
        "train_seconds": round(train_seconds, 1),
        "test_accuracy_10k": round(acc_10k, 4),
        "test_accuracy_npz": round(acc_npz, 4),
        "n_test_npz": n,
        "torch_version": torch.__version__,
        "onnx_opset": OPSET,
        "onnx_exporter": "torch.onnx.export (legacy TorchScript, dynamo=False)",
        "onnx_op_counts": op_counts,
        "normalisation": {"formula": "(x/255 - mean) / std", "mean": MEAN, "std": STD},
        "classes": CLASSES,
    }
    json_path = args.out_dir / f"{args.out_name}.json"
    json_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {onnx_path}, {json_path} (test data {npz_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
