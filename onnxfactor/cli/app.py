"""``onnxfactor`` application: commands, and the one mapping from exceptions to exit codes."""

from __future__ import annotations

import os
import sys
import traceback

import typer
from rich.console import Console
from rich.markup import escape

from onnxfactor.cli import commands
from onnxfactor.cli import search as search_command

app = typer.Typer(
    name="onnxfactor",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Compress the Conv layers of an ONNX model by tensor decomposition at VBMF-chosen ranks, keep only "
    "what ONNX Runtime measures faster, and prove it. Exit codes: 0 ok, 1 internal error, 2 usage, 3 validation "
    "failed (--max-rel-error), 4 bad input model, 5 nothing to compress, 6 output error, 7 no search candidate meets the requirements.",
)
app.command("compress")(commands.compress)
app.command("analyze")(commands.analyze)
app.command("validate")(commands.validate)
app.command("finetune")(commands.finetune)
app.command("search")(search_command.search)
app.command("plot")(commands.plot)


def _click_exception_type() -> type[Exception]:
    """The ``ClickException`` class typer raises usage errors with.

    Older typer raises ``click``'s; recent typer (0.29 here) vendors click as ``typer._click`` and
    ``click`` itself may not be installed. Either way it is a base class of ``typer.BadParameter``.
    """
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main() -> None:
    """Console-script entry point: run the app, turning errors into one line and an exit code."""
    from onnxfactor.errors import OnnxFactorError

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    click_exception = _click_exception_type()
    try:
        # Outside standalone mode typer returns the code of a ctx.exit() (--help: 0, Ctrl-C: 130).
        code = app(standalone_mode=False)
    except OnnxFactorError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}")
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except click_exception as e:  # usage errors (bad option value, missing argument): exit code 2
        if e.format_message().strip():  # empty for no arguments: typer has printed the help already
            e.show()
        sys.exit(e.exit_code)
    except Exception as e:
        if os.environ.get("ONNXFACTOR_DEBUG"):
            traceback.print_exc()
        else:
            err.print(
                f"[bold red]internal error:[/] {escape(f'{type(e).__name__}: {e}')} (a bug in onnxfactor; "
                "rerun with ONNXFACTOR_DEBUG=1 for the traceback and please report it)"
            )
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
