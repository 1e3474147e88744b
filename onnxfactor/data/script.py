"""A data-loader script ``path/to/file.py[:function]`` as a :class:`FeedSource` (Polygraphy's
``--data-loader-script`` convention).

The file is imported by path once, when the source is opened (its folder is on ``sys.path`` during
the import, so it can import its neighbours); ``function`` (default ``load_data``) is called with no
arguments on every pass and returns an iterable of feed dicts, one per batch: input name -> array,
with an optional ``labels`` entry (one class per sample) and an optional ``__broadcast__`` entry (see
:mod:`onnxfactor.data.iterable`). Every batch passes :func:`onnxfactor.data.checks.check_feeds`.
An exception raised by the script, on import, on the call or while yielding, becomes one
:class:`UsageError` line naming the script and the exception.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import ModuleType

from onnxfactor.errors import UsageError, first_line

from .iterable import checked_batches
from .signature import InputSignature
from .source import Batch, FeedSource

DEFAULT_FUNCTION = "load_data"


def parse_script(text: str, default: str = DEFAULT_FUNCTION) -> tuple[Path, str] | None:
    """``"loader.py:make"`` -> (Path("loader.py"), "make"); ``"loader.py"`` -> (..., ``default``); None otherwise."""
    base, sep, function = text.rpartition(":")
    if sep and base.lower().endswith(".py") and function.isidentifier():
        return Path(base), function
    if text.lower().endswith(".py"):
        return Path(text), default
    return None


def script_error(e: BaseException) -> str:
    """``ExceptionType: first line`` of an exception raised by user code."""
    return f"{type(e).__name__}: {first_line(e)}"


def import_script(path: Path, label: str, flag: str, kind: str = "data-loader script") -> ModuleType:
    """Import the Python file ``path`` by path (its folder on ``sys.path`` during the import); an
    exception on import becomes one :class:`UsageError` line naming ``kind``, ``label`` and ``flag``."""
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    name = f"_onnxfactor_loader_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"{kind} {label} cannot be imported as a Python file ({flag})")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses, pickling and typing in the script look the module up here
    folder = str(path.parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except (KeyboardInterrupt, UsageError):
        sys.modules.pop(name, None)
        raise
    except BaseException as e:  # noqa: BLE001 - user code may raise anything, SystemExit included
        sys.modules.pop(name, None)
        raise UsageError(f"{kind} {label} failed on import: {script_error(e)} (fix the script given to {flag})") from None
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:
            pass
    return module


class ScriptSource(FeedSource):
    """The feed dicts a function of a Python file returns (see the module docstring)."""

    def __init__(self, path: Path, function: str, inputs: list[InputSignature], *, flag: str = "--data"):
        self.path = Path(path)
        self.function = function
        self.inputs = inputs
        self.flag = flag
        self.label = f"{self.path.name}:{function}"
        if not self.path.is_file():
            raise UsageError(f"{flag} script {str(self.path)!r} does not exist")
        module = import_script(self.path.resolve(), self.path.name, flag)
        fn = getattr(module, function, None)
        if not callable(fn):
            functions = sorted(
                n for n, v in vars(module).items()
                if inspect.isfunction(v) and v.__module__ == module.__name__ and not n.startswith("_")
            )
            raise UsageError(
                f"data-loader script {self.path.name} has no function {function!r}; its functions: "
                f"{', '.join(functions) or '(none)'} (name one with {flag} {self.path.name}:FUNCTION)"
            )
        self._fn = fn
        self._samples: int | None = None

    @property
    def describe(self) -> str:
        return self.label if self._samples is None else f"{self.label} ({self._samples} samples)"

    @property
    def samples(self) -> int | None:
        return self._samples

    @property
    def paths(self) -> frozenset[Path]:
        return frozenset({self.path.resolve()})

    @property
    def code_paths(self) -> frozenset[Path]:
        return self.paths  # two functions of one script may load disjoint data: the samples decide

    def _items(self) -> Iterator:
        try:
            result = self._fn()
        except (KeyboardInterrupt, UsageError):
            raise
        except BaseException as e:  # noqa: BLE001 - user code may raise anything
            raise UsageError(f"data-loader script {self.label}() failed when called: {script_error(e)} (fix the script given to {self.flag})") from None
        if isinstance(result, (str, bytes, Mapping)) or not isinstance(result, Iterable):
            hint = "; return a list of feed dicts (or yield them)" if isinstance(result, Mapping) else ""
            raise UsageError(
                f"data-loader script {self.label}() returned {type(result).__name__}, not an iterable of feed dicts{hint} ({self.flag})"
            )
        try:
            return iter(result)
        except Exception as e:  # noqa: BLE001 - user code may raise anything
            raise UsageError(f"data-loader script {self.label}() returned an object that fails to iterate: {script_error(e)} ({self.flag})") from None

    def batches(self) -> Iterator[Batch]:
        count = 0

        def failure(e: BaseException, index: int) -> str:
            return f"data-loader script {self.label} failed while yielding batch {index}: {script_error(e)} (fix the script given to {self.flag})"

        for batch in checked_batches(self._items(), self.inputs, source=self.path.name, fix=f"the script given to {self.flag}", failure=failure):
            count += batch.size
            yield batch
        self._samples = count
