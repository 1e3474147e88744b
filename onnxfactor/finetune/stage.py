"""The fine-tuning stage: what is trained, what the features are, and the ``finetune`` command's run.

Which initializers train (``--train factors``, the default): the weights and biases of the convs
the rewrite made, recognised by their node names (``<node>/<method>_<role>``, see
:mod:`onnxfactor.rewrite`), so a model compressed by an earlier run is fine-tuned the same way.
``--train all``: every float initializer but batch-norm statistics. The features are the output
tensors of each chain's last conv, which carry the replaced Conv's output name.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import dataclasses

import onnx

from onnxfactor.config import CompressConfig, FinetuneConfig
from onnxfactor.errors import UsageError

#: node names the rewrite gives a chain's convs: ``<node>/<method>_<role>``, the role itself may hold
#: underscores (the SVD of a 1x1 conv: ``svd_svd_a``, ``svd_svd_b``; before this was allowed, every
#: 1x1 conv decomposed by SVD was left out of the fine-tuning: on PP-OCRv6 tiny rec 3 of 20 chains trained)
CHAIN_NODE = re.compile(r"^(?P<base>.+)/(?:tucker2|tucker3|cp3|cp4|svd)_[A-Za-z0-9_]+$")


def chain_tensors(model: onnx.ModelProto, train: str = "factors") -> tuple[set[str], list[str]]:
    """``(trainable initializer names, feature tensor names)`` of a compressed model (module docstring);
    the two-node chains of fully connected layers (Gemm / MatMul, ``<node>/svd_first|last``) count too."""
    initializers = {t.name: t for t in model.graph.initializer}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    last_of_chain: dict[str, str] = {}
    trainable: set[str] = set()
    for node in model.graph.node:
        match = CHAIN_NODE.match(node.name) if node.op_type in ("Conv", "Gemm", "MatMul") else None
        if match is None:
            continue
        last_of_chain[match.group("base")] = node.output[0]
        trainable.update(n for n in node.input[1:] if n in initializers)
    if train == "all":
        stats = {n for node in model.graph.node if node.op_type == "BatchNormalization" for n in node.input[3:5]}
        trainable = {n for n, t in initializers.items() if t.data_type in floats and n not in stats}
    return trainable, list(last_of_chain.values())


def check_same_interface(student: onnx.ModelProto, teacher: onnx.ModelProto) -> None:
    """A one-line :class:`UsageError` unless both models have the same real inputs and outputs."""
    from onnxfactor.validation.inputs import real_inputs

    for what, a, b in (("inputs", [v.name for v in real_inputs(student)], [v.name for v in real_inputs(teacher)]),
                       ("outputs", [o.name for o in student.graph.output], [o.name for o in teacher.graph.output])):
        if sorted(a) != sorted(b):
            raise UsageError(f"the teacher's {what} ({', '.join(b)}) are not the compressed model's ({', '.join(a)}); "
                             f"give the original of this compressed model with --teacher")


def finetune_model(compressed: onnx.ModelProto, teacher: onnx.ModelProto, data, config: FinetuneConfig, *,
                   images=None, samples: int | None = None, progress=None, extra_trainable: set[str] = frozenset()) -> dict:
    """Distil ``teacher`` into ``compressed`` on ``data`` and write the trained values into ``compressed``.

    ``data`` is anything :func:`onnxfactor.data.open_source` takes. Returns the report's
    ``finetune`` section. Raises :class:`onnxfactor.finetune.graph.ConversionError` when the
    converter cannot run or reproduce ``compressed``. ``extra_trainable``: initializers trained
    besides ``config.train``'s (the iterative mode's Convs waiting for their stage).
    """
    from onnxfactor.data import open_source
    from onnxfactor.finetune.distill import distill
    from onnxfactor.finetune.writeback import write_back

    trainable, features = chain_tensors(compressed, config.train)
    trainable |= set(extra_trainable)
    if not trainable:
        raise UsageError("the model has no decomposed chain to fine-tune (no <node>/<method>_<role> convs); use --train all")
    fixed = fixed_batch(teacher)
    note = None
    if fixed is not None and fixed != config.batch_size:  # the graph (and its Reshapes) only runs that batch
        note = f"batch size {fixed}, the model's fixed batch dimension (not --batch-size {config.batch_size})"
        config = dataclasses.replace(config, batch_size=fixed)
    source = open_source(data, teacher, images=images, max_samples=samples, batch_size=config.batch_size, role="calibration")
    values, result = distill(compressed, teacher, source, trainable, features, config, progress=progress)
    written = write_back(compressed, values)
    return {**result.to_dict(), "train": config.train, "trained_initializers": len(written), "features": len(features),
            "data": source.describe, **({"batch_note": note} if note else {})}


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The fixed axis 0 of the model's real inputs (NudeNet 320n, ddddocr det: 1), None when it is dynamic."""
    from onnxfactor.data.signature import signature

    dims = {s.batch_dim for s in signature(model) if s.declared}
    return next(iter(dims)) if len(dims) == 1 and None not in dims else None


def preflight(model: onnx.ModelProto, config: CompressConfig, data):
    """Before the long part of ``compress --finetune``: torch present, data given, ``model`` runnable
    by the converter. A model it cannot run gets the layer-wise reconstruction instead; returns
    ``(config, None)`` or ``(config with reconstruction steps, the report's fallback section)``."""
    from onnxfactor.calibration import CalibrationData
    from onnxfactor.finetune.distill import import_torch
    from onnxfactor.finetune.graph import supported

    import_torch()
    if data is None or isinstance(data, CalibrationData):
        raise UsageError("fine-tuning needs its data: give --calibration DATA (inputs, not precomputed statistics)")
    reason = supported(model)
    if reason is None:
        return config, None
    steps = config.calibration.reconstruct_steps or 300
    config = dataclasses.replace(config, calibration=dataclasses.replace(config.calibration, reconstruct_steps=steps))
    return config, {"fallback": f"{reason}: layer-wise reconstruction ({steps} steps per chain) instead of fine-tuning"}


def finetune_or_skip(teacher: onnx.ModelProto, out: onnx.ModelProto, data, config: FinetuneConfig, **kwargs) -> dict:
    """:func:`finetune_model` (``out`` in place); a late conversion failure, or a model in which no
    layer ended up decomposed (e.g. every chain rolled back), is reported, not raised."""
    from onnxfactor.finetune.graph import ConversionError

    if config.train == "factors" and not kwargs.get("extra_trainable") and not chain_tensors(out, config.train)[0]:
        return {"skipped": "fine-tuning skipped: no layer was decomposed, so --train factors has nothing to train"}
    try:
        return finetune_model(out, teacher, data, config, **kwargs)
    except ConversionError as e:
        return {"skipped": f"fine-tuning skipped: {e}"}


def finetune_file(compressed_path, output_path, teacher_path, data, *, config: FinetuneConfig, images=None, samples=None,
                  validation=None, report_path=None, progress=None, allow_overlap: bool = False) -> dict:
    """The ``finetune`` command: fine-tune a compressed model file against its original, write it atomically.

    The compressed file is read as it is (not normalised), so that everything but the trained
    initializers is written back unchanged; then the usual checks (``onnx.checker``, an ONNX
    Runtime load), the validation against the teacher (``validation``) and the atomic rename.
    Returns the report (a dict, also written to ``report_path``).
    """
    import json

    from onnxfactor import io as model_io
    from onnxfactor.checks import check_written_model
    from onnxfactor.data import check_data_exists, check_disjoint_data
    from onnxfactor.errors import NothingToCompress
    from onnxfactor.finetune.graph import ConversionError
    from onnxfactor.validation.run import validate
    from onnxfactor.report import to_jsonable

    compressed_path, output_path = Path(compressed_path), Path(output_path)
    model_io.check_output_path(output_path, "output", protected={"compressed model": compressed_path, "teacher": teacher_path})
    if report_path is not None:
        model_io.check_output_path(report_path, "report", protected={"compressed model": compressed_path, "output": output_path})
    check_data_exists(data, role="calibration")
    if validation is not None:
        check_data_exists(validation.data, role="validation")
    student = model_io.load_model(compressed_path)
    teacher = model_io.load_model(teacher_path).model
    check_same_interface(student.model, teacher)
    if validation is not None and validation.data is not None and not allow_overlap:
        check_disjoint_data(teacher, data, validation.data, images=images, samples=samples, validation_images=validation.images,
                            validation_samples=validation.max_samples)
    raw = onnx.load(str(compressed_path))
    start = time.perf_counter()
    try:
        tuned = finetune_model(raw, teacher, data, config, images=images, samples=samples, progress=progress)
    except ConversionError as e:  # ddddocr's OCR model holds an LSTM: exit 5, not a crash
        raise NothingToCompress(
            f"cannot fine-tune {compressed_path.name}: {e} (the layer-wise reconstruction needs no conversion: "
            f"onnxfactor compress ORIGINAL OUT --calibration DATA --reconstruct 300; compress --finetune falls back to it)"
        ) from None
    report = {"input_path": str(compressed_path), "teacher": str(teacher_path), "output_path": None, "finetune": tuned}
    report["finetune"]["wall_seconds"] = round(time.perf_counter() - start, 2)
    try:
        with model_io.write_temporary(raw, output_path, external_data=student.external_data) as written:
            report["warnings"] = check_written_model(written.path, original=compressed_path)
            if validation is not None:
                result = validate(Path(teacher_path), written.path, options=validation)
                report["validation"] = result.to_dict()
            written.commit()
        report["output_path"] = str(output_path)
    finally:
        if report_path is not None:
            Path(report_path).write_text(json.dumps(to_jsonable(report), indent=2) + "\n")
    return report

