"""ONNX Runtime: which execution providers exist, which one the user meant, and sessions to run.

``onnxruntime`` is an optional dependency (extras ``[cpu]`` and ``[gpu]``), so it is imported only
inside these functions; a missing install becomes a :class:`UsageError` that names the extra.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from typing import TYPE_CHECKING

import onnx

from onnxfactor.errors import InputModelError, UsageError

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_SUFFIX = "executionprovider"
# Distributions that each install the same top-level ``onnxruntime`` module: with two of them
# present, whichever was installed last wins file by file and the CUDA provider can vanish.
_ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")
_INSTALL_HINT = "pip install 'onnxfactor[cpu]' (or 'onnxfactor[gpu]' for CUDA)"
# A serialised ModelProto must fit in one protobuf message.
_MAX_PROTO_BYTES = 2**31 - 1


def _import_ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise UsageError(f"onnxruntime is not installed ({e}); {_INSTALL_HINT}") from None
    return onnxruntime


def available_providers() -> list[str]:
    """The execution providers this ONNX Runtime build offers (``onnxruntime.get_available_providers()``)."""
    return list(_import_ort().get_available_providers())


def ort_conflict_warning() -> str | None:
    """A warning when both ``onnxruntime`` and ``onnxruntime-gpu`` are installed, else None.

    Both distributions install the ``onnxruntime`` module; together, the one installed last
    overwrites the other's files and the CUDA provider can silently disappear.
    """
    found = []
    for dist in _ORT_DISTRIBUTIONS:
        try:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    if len(found) < 2:
        return None
    return (
        f"both {' and '.join(found)} are installed; they share the 'onnxruntime' module and the CUDA "
        f"provider may be missing. Fix: pip uninstall -y {' '.join(_ORT_DISTRIBUTIONS)}, then "
        f"pip install 'onnxfactor[gpu]' (or 'onnxfactor[cpu]')"
    )


def _short_name(provider: str) -> str:
    """``"CUDAExecutionProvider"`` -> ``"cuda"``; names are compared in this form."""
    name = provider.strip().lower()
    return name[: -len(_SUFFIX)] if name.endswith(_SUFFIX) else name


def resolve_providers(requested: str | None = None) -> list[str]:
    """The provider list for a session: the requested provider, then CPU as fallback.

    ``None`` picks CUDA (then CPU) when this build offers CUDA, else CPU only. A name is matched
    case-insensitively, with or without the ``ExecutionProvider`` suffix: ``"cpu"``, ``"CUDA"`` and
    ``"CUDAExecutionProvider"`` all work. Raises :class:`UsageError` listing the available providers
    when the name matches none of them.
    """
    available = available_providers()
    if requested is None:
        return [CUDA, CPU] if CUDA in available else [CPU]
    wanted = _short_name(requested)
    matches = [p for p in available if _short_name(p) == wanted] if wanted else []
    if not matches:
        hint = "install onnxfactor[gpu] for CUDA"
        conflict = ort_conflict_warning()
        if conflict is not None:
            hint = f"{hint}; {conflict}"
        raise UsageError(
            f"execution provider {requested!r} is not available; available: {', '.join(available)} ({hint})"
        )
    provider = matches[0]
    return [provider] if provider == CPU else [provider, CPU]


def make_session(
    model: onnx.ModelProto | str | os.PathLike,
    providers: list[str],
    *,
    threads: int | None = None,
    measuring: bool = False,
    spinning: bool = True,
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session for a ModelProto (loaded from its bytes) or a model file.

    ``threads`` sets ``intra_op_num_threads`` (None: ONNX Runtime's default, one per physical core).
    ``measuring=True`` is for timing: worker threads do not spin while waiting (spinning threads of
    one session steal the cores of the other on a shared machine and distort both timings) and
    nodes run sequentially. ``spinning=False`` only stops the spinning, for sessions that take
    turns with another session or with torch (the correction's two probes, the distillation's
    teacher): a spinning idle worker steals the core the other one needs (measured on 2 cores,
    fashion_vgg_wide: correction 2.7-3.7 -> 0.9 s, a distillation epoch 4.0 -> 3.5 s; NudeNet
    320n: correction 28.4 -> 21.5 s). A session run back to back keeps it: spinning bridges
    the gaps between its nodes. The graph optimisation level is ONNX Runtime's default
    (``ORT_ENABLE_ALL``), so two models compared with the same arguments are optimised alike.
    ONNX Runtime's own exceptions (model cannot be loaded) propagate unchanged.
    """
    ort = _import_ort()
    options = ort.SessionOptions()
    # ONNX Runtime's own warnings (e.g. unused initializers it removes from a source model) would
    # flood the terminal during measurements; errors still raise
    options.log_severity_level = 4  # failures raise, and onnxfactor reports them in one line
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise UsageError(f"--threads must be a positive integer, got {threads!r}")
        options.intra_op_num_threads = threads
    if measuring or not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if measuring:
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if isinstance(model, onnx.ModelProto):
        if model.ByteSize() > _MAX_PROTO_BYTES:
            raise InputModelError("the model is larger than 2 GiB: save it with external data and pass its path")
        source = model.SerializeToString()
    else:
        source = os.fspath(model)
    session = ort.InferenceSession(source, sess_options=options, providers=list(providers))
    used = session.get_providers()
    if providers and used and used[0] != providers[0]:
        # onnxruntime-gpu lists CUDA as available even when the CUDA libraries fail to load, then
        # falls back to the next provider with only a log line of its own.
        log.warning("requested %s but ONNX Runtime is using %s", providers[0], ", ".join(used))
    return session
