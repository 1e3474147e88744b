"""The validation stage: options, the comparison of two models (or two files) on data, and the
refusal of validation data that overlaps the calibration data.

:mod:`onnxfactor.validation.compare` compares two models on an :class:`InputSet`; this module
turns what a user gives (a data source, image preprocessing, a metric, a provider) into that
comparison. :func:`onnxfactor.pipeline.compress_file` calls it after the written model's checks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxfactor import io as model_io
from onnxfactor.io import check_output_path


@dataclass(frozen=True)
class ValidationOptions:
    """How to compare the compressed model against the original in ONNX Runtime.

    ``data`` is anything :func:`onnxfactor.data.open_source` takes (an ``.npz``, an image folder
    read with ``images``, a ``script.py[:function]``, an iterable of feed dicts), or None for
    seeded random inputs.
    """

    data: object = None
    images: object = None  # onnxfactor.data.ImageSpec for an image folder
    seed: int = 0
    max_samples: int | None = None
    provider: str | None = None
    threads: int | None = None
    latency_runs: int = 50
    max_rel_error: float | None = None
    metric: object = None  # a task metric: "file.py[:function]" or a callable (onnxfactor.validation.metric)


def validate(
    original: str | os.PathLike | onnx.ModelProto,
    compressed: str | os.PathLike | onnx.ModelProto,
    *,
    options: ValidationOptions | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
):
    """Run both models in ONNX Runtime on the same inputs; errors, agreement, accuracy, latency.

    Returns a :class:`onnxfactor.validation.ValidationResult`.
    """
    from onnxfactor.validation.compare import validate as compare_models
    from onnxfactor.validation.inputs import make_inputs
    from onnxfactor.validation.metric import as_metric
    from onnxfactor.validation.providers import resolve_providers

    options = options or ValidationOptions()
    reference = original if isinstance(original, onnx.ModelProto) else model_io.load_model(original).model
    inputs = make_inputs(reference, data=options.data, images=options.images, shapes=input_shapes or {}, seed=options.seed,
                         max_samples=options.max_samples)
    return compare_models(
        original, compressed, inputs=inputs, providers=resolve_providers(options.provider), threads=options.threads,
        latency_runs=options.latency_runs, metric=as_metric(options.metric),
    )


def validate_files(original, compressed, *, options: ValidationOptions, input_shapes=None, report_path=None):
    """:func:`validate` for two files, optionally writing the result as JSON (never over either model)."""
    if report_path is not None:
        check_output_path(report_path, "report", protected={"original model": original, "compressed model": compressed})
    for p in (original, compressed):
        model_io.load_model(p)  # clear errors for missing / non-ONNX files
    result = validate(Path(original), Path(compressed), options=options, input_shapes=input_shapes)
    if report_path is not None:
        import json

        from onnxfactor.report import to_jsonable

        Path(report_path).write_text(json.dumps(to_jsonable(result.to_dict()), indent=2) + "\n")
    return result


def check_disjoint(input_path: Path, calibration, images, config, validation: ValidationOptions) -> None:
    """Refuse calibration data that shares a file or a sample with the validation data
    (:mod:`onnxfactor.data.overlap`); ``config`` is the :class:`onnxfactor.config.CompressConfig`
    (its calibration sample count) or None."""
    from onnxfactor.config import CompressConfig
    from onnxfactor.data import check_disjoint_data

    check_disjoint_data(model_io.load_model(input_path).model, calibration, validation.data, images=images,
                        samples=(config or CompressConfig()).calibration.samples, validation_images=validation.images,
                        validation_samples=validation.max_samples)
