"""onnxfactor: compress the Conv layers of ONNX models by tensor decomposition at VBMF ranks, measured in ONNX Runtime.

Public API::

    import onnxfactor
    model, report = onnxfactor.compress("in.onnx")                  # ModelProto + CompressReport
    report = onnxfactor.compress_file("in.onnx", "out.onnx")         # checked, validated, atomic write
    report = onnxfactor.analyze("in.onnx")                           # ranks and predicted savings only
    result = onnxfactor.validate("in.onnx", "out.onnx")              # ONNX Runtime comparison
    model, report = onnxfactor.compress("in.onnx", calibration="calib.npz")  # fitted to real inputs

Attributes are imported lazily so that ``import onnxfactor`` (and the CLI's ``--help``) stays fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

_EXPORTS = {
    "compress": "onnxfactor.pipeline",
    "compress_file": "onnxfactor.pipeline",
    "analyze": "onnxfactor.pipeline",
    "calibrate": "onnxfactor.pipeline",
    "validate": "onnxfactor.validation.run",
    "CompressResult": "onnxfactor.pipeline",
    "ValidationOptions": "onnxfactor.validation.run",
    "CompressConfig": "onnxfactor.config",
    "RankConfig": "onnxfactor.config",
    "LatencyConfig": "onnxfactor.config",
    "CalibrationConfig": "onnxfactor.config",
    "CalibrationData": "onnxfactor.calibration",
    "ImageSpec": "onnxfactor.data",
    "CompressReport": "onnxfactor.report",
    "LayerReport": "onnxfactor.report",
    "OnnxFactorError": "onnxfactor.errors",
    "UsageError": "onnxfactor.errors",
    "InputModelError": "onnxfactor.errors",
    "OutputError": "onnxfactor.errors",
    "NothingToCompress": "onnxfactor.errors",
    "ValidationFailed": "onnxfactor.errors",
    "InternalError": "onnxfactor.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'onnxfactor' has no attribute {name!r}")
