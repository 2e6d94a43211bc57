"""The ``steerlab`` command line: a thin shell over the library.

Each command group lives in its own module and registers itself on :data:`app`:
``_core`` (demo, generate), ``_vectors`` (compute, analyze, scan), ``_train`` (train),
``_ablate`` (ablate, bake, export-gguf), ``_sweep`` (sweep), ``_serve`` (serve) and ``_eval``
(eval caa, eval concept).

Errors are handled in one place, :class:`ErrorHandlingGroup`, for every command (so a new
command needs no ``try``): a user's mistake prints one line on stderr, ``error: <message>``,
and exits with 2 for bad usage (unknown option, bad value: click usage errors,
:class:`~steerlab.errors.InvalidInputError`, :class:`~steerlab.errors.LayerIndexError`) or 1
for any other failure (missing or corrupt file, vector for another model, unwritable output,
missing model). No traceback is printed unless ``--debug`` is given (anywhere on the command
line) or ``STEERLAB_DEBUG=1`` is set.

>>> from typer.testing import CliRunner
>>> "demo" in CliRunner().invoke(app, ["--help"]).output
True
>>> result = CliRunner().invoke(app, ["analyze", "nothing.safetensors", "--no-lens"])
>>> result.exit_code, result.stderr.strip()
(2, 'error: no vector file at nothing.safetensors')
>>> result = CliRunner().invoke(app, ["analyze", "--zzz"])
>>> result.exit_code, result.stderr.strip()
(2, "error: No such option: --zzz (see 'steerlab analyze --help')")
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperGroup

from steerlab.cli import _ablate, _core, _eval, _serve, _sweep, _train, _vectors

__all__ = ["ErrorHandlingGroup", "app", "exit_code_for", "main"]

try:  # typer vendors click; its "no arguments: show the help" signal is not public
    from typer._click.exceptions import NoArgsIsHelpError as _NoArgsIsHelp
except ImportError:  # pragma: no cover - older typer on the real click
    from click.exceptions import NoArgsIsHelpError as _NoArgsIsHelp  # type: ignore[assignment]

DEBUG_ENV = "STEERLAB_DEBUG"


def exit_code_for(error: BaseException) -> int:
    """2 for a bad argument (usage), 130 for Ctrl-C, 1 for everything else.

    >>> import steerlab as sl
    >>> exit_code_for(sl.InvalidInputError("x")), exit_code_for(sl.VectorFileError("x"))
    (2, 1)
    """
    from steerlab.errors import InvalidInputError, LayerIndexError, VectorFileNotFoundError

    if isinstance(error, KeyboardInterrupt):
        return 130
    if isinstance(error, typer.TyperException):  # click's usage errors carry exit_code 2
        return int(getattr(error, "exit_code", 1))
    if isinstance(error, VectorFileNotFoundError):
        return 2  # a path argument that names nothing is a usage error, as click.Path has it
    if isinstance(error, (InvalidInputError, LayerIndexError)):
        return 2
    return 1


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _message(error: BaseException) -> str:
    from steerlab.errors import SteerlabError

    if isinstance(error, typer.TyperException):
        return _one_line(error.format_message())
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    if isinstance(error, SteerlabError):
        return _one_line(str(error))
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        return _one_line(f"{where}{error.strerror or error}")
    # not a user's mistake: still one line, with the way to the traceback
    return _one_line(
        f"internal error ({type(error).__name__}: {error}); rerun with --debug for the traceback"
    )


def _debug_requested(args: list[str]) -> bool:
    """Remove every ``--debug`` before a ``--`` separator; true if there was one (or the
    environment asks for it)."""
    found = False
    end = args.index("--") if "--" in args else len(args)
    for i in reversed(range(end)):
        if args[i] == "--debug":
            del args[i]
            found = True
    return found or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")


class ErrorHandlingGroup(TyperGroup):
    """The command group: runs a command, turns any error into one line on stderr."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        debug = _debug_requested(argv)
        try:
            result = super().main(
                argv,
                prog_name,
                complete_var,
                standalone_mode=False,
                windows_expand_args=windows_expand_args,
                **extra,
            )
            code = result if isinstance(result, int) and not isinstance(result, bool) else 0
        except _NoArgsIsHelp as error:
            error.show()
            code = 2
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            code = 1
        except typer.Exit as exit_:
            code = exit_.exit_code
        except (Exception, KeyboardInterrupt) as error:
            if debug:
                raise
            message = _message(error)
            ctx = getattr(error, "ctx", None)
            if isinstance(error, typer.TyperException) and ctx is not None:
                message += f" (see '{ctx.command_path} --help')"
            typer.echo(f"error: {message}", err=True)
            code = exit_code_for(error)
        if not standalone_mode:
            return code
        sys.exit(code)


app = typer.Typer(
    name="steerlab",
    help=(
        "Steer language models by editing their activations at inference time. "
        "Add --debug (or set STEERLAB_DEBUG=1) to see the traceback of an error."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    cls=ErrorHandlingGroup,
)

for _module in (_core, _vectors, _train, _ablate, _sweep, _serve, _eval):
    _module.register(app)


def main() -> None:
    """Console-script entry point."""
    app()
