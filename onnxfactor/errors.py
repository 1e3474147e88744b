"""Error types. Every user-facing failure is an :class:`OnnxFactorError` with an exit code.

The CLI prints ``error: <message>`` (one line, with a hint of the fix) and exits with ``exit_code``.
:class:`InternalError` marks a bug in onnxfactor itself; the CLI shows its traceback when
``ONNXFACTOR_DEBUG=1`` is set.

Exit codes (also in the README):

====  =========================================================================
0     success
1     internal error (a bug: please report it)
2     usage error: bad option value, bad rank file, bad ``--input-shape``, bad provider
3     validation failed: an output's relative L2 error exceeds ``--max-rel-error``
4     input model error: missing, unreadable, not ONNX, truncated, or invalid
5     nothing to compress: the model has no Conv node that can be decomposed
6     output error: output path equals the input, directory missing or not writable,
      or the rewritten model failed ``onnx.checker`` / ONNX Runtime loading
7     search: no candidate meets the requirements (``onnxfactor search``; no model written
      unless ``--write-best``)
====  =========================================================================
"""

from __future__ import annotations


class OnnxFactorError(Exception):
    """Base class of user-facing errors (bad input, bad options, failed checks)."""

    exit_code = 1


class UsageError(OnnxFactorError):
    """A bad option value, rank file, input-shape spec or provider name."""

    exit_code = 2


class ValidationFailed(OnnxFactorError):
    """The compressed model's outputs differ from the original's beyond ``--max-rel-error``."""

    exit_code = 3


class InputModelError(OnnxFactorError):
    """The input model is missing, unreadable, not ONNX, truncated or invalid."""

    exit_code = 4


class NothingToCompress(OnnxFactorError):
    """The model contains no Conv node (or none that can be decomposed)."""

    exit_code = 5


class OutputError(OnnxFactorError):
    """The output cannot be written, or the rewritten model failed its checks."""

    exit_code = 6


class ConstraintsNotMet(OnnxFactorError):
    """``onnxfactor search`` found no candidate meeting every requirement."""

    exit_code = 7


class InternalError(Exception):
    """A bug in onnxfactor: an invariant did not hold. Not a user error."""

    exit_code = 1


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if empty): ONNX Runtime's errors
    run over many lines, our messages are one."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
