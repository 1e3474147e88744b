"""``onnxfactor`` application: commands, and the one mapping from exceptions to exit codes."""

from __future__ import annotations

import os
import sys
import traceback

import typer
from rich.console import Console
from rich.markup import escape

from onnxfactor.cli import commands

app = typer.Typer(
    name="onnxfactor",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Compress the Conv layers of an ONNX model by Tucker-2 decomposition at VBMF-chosen ranks, "
    "and prove it with ONNX Runtime. Exit codes: 0 ok, 1 internal error, 2 usage, 3 validation "
    "failed (--max-rel-error), 4 bad input model, 5 nothing to compress, 6 output error.",
)
app.command("compress")(commands.compress)
app.command("analyze")(commands.analyze)
app.command("validate")(commands.validate)


def main() -> None:
    """Console-script entry point: run the app, turning errors into one line and an exit code."""
    from onnxfactor.errors import OnnxFactorError

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        app(standalone_mode=False)
    except OnnxFactorError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}")
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except Exception as e:  # click usage errors carry their own exit code (2)
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if os.environ.get("ONNXFACTOR_DEBUG"):
            traceback.print_exc()
        else:
            err.print(
                f"[bold red]internal error:[/] {escape(f'{type(e).__name__}: {e}')} (a bug in onnxfactor; "
                "rerun with ONNXFACTOR_DEBUG=1 for the traceback and please report it)"
            )
        sys.exit(1)


if __name__ == "__main__":
    main()
