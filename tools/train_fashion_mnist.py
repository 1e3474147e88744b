#!/usr/bin/env python3
"""Train the bundled Fashion-MNIST CNN and export it to ONNX.

This is the (re-runnable) recipe for the real model shipped in ``models/``:

* ``models/fashion_cnn.onnx``        VGG-style CNN, opset 17, input ``input``
  float32 ``[batch, 1, 28, 28]`` (already normalised), output ``logits``
  ``[batch, 10]``.  BatchNorm is folded into the preceding Conv before export,
  so every Conv carries a bias and the graph is only
  Conv / Relu / MaxPool / Flatten / Gemm.
* ``models/fashion_mnist_test.npz``  the first ``--n-test-npz`` images of the
  official Fashion-MNIST test set, normalised exactly as the model expects
  (``input`` float32 ``[N, 1, 28, 28]``) with their ``labels`` (int64 ``[N]``).
* ``models/fashion_cnn.json``        metadata: architecture, training setup,
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

    python tools/train_fashion_mnist.py --epochs 6 --seed 0
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
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
ARCHITECTURE = (
    "conv3x3(1->32,pad1) BN ReLU, conv3x3(32->32,pad1) BN ReLU, maxpool2; "
    "conv3x3(32->64,pad1) BN ReLU, conv3x3(64->64,pad1) BN ReLU, maxpool2; "
    "conv3x3(64->128,pad1) BN ReLU, conv3x3(128->128,pad1) BN ReLU, maxpool2 (-> 128x3x3); "
    "flatten, linear(1152->256) ReLU, dropout 0.3, linear(256->10). "
    "BatchNorm folded into the convs in the exported ONNX (Conv with bias), dropout removed."
)


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


def build_model(torch):
    nn = torch.nn

    def block(cin: int, cout: int) -> list:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(1, 32), *block(32, 32), nn.MaxPool2d(2),
        *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
        *block(64, 128), *block(128, 128), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128 * 3 * 3, 256), nn.ReLU(inplace=True),
        nn.Dropout(0.3),
        nn.Linear(256, 10),
    )


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
    p.add_argument("--epochs", type=int, default=6, help="training epochs (default 6)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out-dir", type=Path, default=Path("models"), help="output folder (default models)")
    p.add_argument("--data-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                   help="folder holding the Fashion-MNIST idx .gz files")
    p.add_argument("--n-test-npz", type=int, default=1000,
                   help="number of leading test images saved to fashion_mnist_test.npz (default 1000)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bfloat16 autocast for training (fp32 master weights; the exported model is "
                        "fp32). 'auto' = on when the CPU has AMX or AVX512-BF16 (default auto)")
    return p.parse_args(argv)


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

    model = build_model(torch).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
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
    onnx_path = args.out_dir / "fashion_cnn.onnx"
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

    # ---- test subset npz
    n = args.n_test_npz
    npz_path = args.out_dir / "fashion_mnist_test.npz"
    np.savez_compressed(npz_path, input=x_test[:n].astype(np.float32), labels=y_test[:n].astype(np.int64))

    with np.load(npz_path) as z:
        acc_npz = onnx_accuracy(sess, z["input"], z["labels"])
    acc_10k = onnx_accuracy(sess, x_test, y_test)
    print(f"onnxruntime accuracy: full test set {acc_10k:.4f}, npz ({n}) {acc_npz:.4f}")

    meta = {
        "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist)",
        "architecture": ARCHITECTURE,
        "input": {"name": "input", "dtype": "float32", "shape": ["batch", 1, 28, 28]},
        "output": {"name": "logits", "dtype": "float32", "shape": ["batch", 10]},
        "epochs": args.epochs,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "optimizer": f"Adam lr {args.lr} with cosine annealing per step; random horizontal flip",
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
    (args.out_dir / "fashion_cnn.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {onnx_path}, {npz_path}, {args.out_dir / 'fashion_cnn.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
