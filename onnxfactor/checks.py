"""The checks every written model passes before it replaces the output: ``onnx.checker`` and an ONNX Runtime load."""

from __future__ import annotations

from pathlib import Path

import onnx

from onnxfactor.errors import InputModelError, OutputError, first_line


def check_written_model(path: Path, original: Path | onnx.ModelProto | None = None) -> list[str]:
    """``onnx.checker`` (full check) and an ONNX Runtime load of the model file at ``path``.

    If the full check fails on a model whose original already fails it (some exporters write
    models that strict shape inference rejects), the basic check is required instead and a
    warning is returned. Raises :class:`OutputError` when a check fails, except when ONNX Runtime
    cannot load the original either: then the input is at fault and :class:`InputModelError` is raised.
    """
    warnings = []
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # noqa: BLE001 - checker raises several types
        original_fails = False
        if original is not None:
            try:
                onnx.checker.check_model(str(original) if isinstance(original, Path) else original, full_check=True)
            except Exception:  # noqa: BLE001
                original_fails = True
        if not original_fails:
            raise OutputError(f"the rewritten model fails onnx.checker: {str(e).splitlines()[0]}") from None
        try:
            onnx.checker.check_model(str(path))
        except Exception as e2:  # noqa: BLE001
            raise OutputError(f"the rewritten model fails onnx.checker: {str(e2).splitlines()[0]}") from None
        warnings.append(f"full onnx.checker fails on the original model too ({str(e).splitlines()[0]}); basic check passed")
    from onnxfactor.validation.providers import make_session

    try:
        make_session(path, ["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own types
        if original is not None:  # e.g. a weight whose type does not match its Conv input
            require_loadable(original, ["CPUExecutionProvider"])
        raise OutputError(f"ONNX Runtime cannot load the rewritten model: {first_line(e)}") from None
    return warnings


def require_loadable(model: onnx.ModelProto | Path, providers: list[str]) -> None:
    """Raise :class:`InputModelError` when ONNX Runtime cannot load the input model (a model or its file)."""
    from onnxfactor.validation.providers import make_session

    try:
        make_session(model, providers)
    except Exception as e:  # noqa: BLE001 - ORT raises its own types
        raise InputModelError(f"ONNX Runtime cannot load the input model: {first_line(e)}; fix the input model first") from None
