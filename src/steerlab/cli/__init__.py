"""The ``steerlab`` command line: a thin shell over the library.

Each command group lives in its own module and registers itself on :data:`app`:
``_core`` (demo, generate), ``_vectors`` (compute, analyze, scan), ``_ablate`` (ablate, bake,
export-gguf), ``_sweep`` (sweep) and ``_eval`` (eval caa, eval concept).

>>> from typer.testing import CliRunner
>>> "demo" in CliRunner().invoke(app, ["--help"]).output
True
"""

from __future__ import annotations

import typer

from steerlab.cli import _ablate, _core, _eval, _sweep, _vectors

__all__ = ["app", "main"]

app = typer.Typer(
    name="steerlab",
    help="Steer language models by editing their activations at inference time.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _module in (_core, _vectors, _ablate, _sweep, _eval):
    _module.register(app)


def main() -> None:
    """Console-script entry point."""
    app()
