"""Checks every command runs on its output paths before doing any (slow) work."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from steerlab.errors import FileWriteError, InvalidInputError

__all__ = [
    "ExpertsOpt",
    "HeadsOpt",
    "SiteOpt",
    "check_output_file",
    "check_output_folder",
    "parse_numbers",
    "site_options",
]

SiteOpt = Annotated[
    str | None,
    typer.Option(
        "--site",
        help="Where the vector acts: resid, attn_out, mlp_out, head or router (default: the "
        "file's own; resid, attn_out and mlp_out vectors may move among those three).",
        show_default=False,
    ),
]
HeadsOpt = Annotated[
    str | None,
    typer.Option(
        "--heads",
        help="With a head-site vector: only these heads, e.g. '1,3' or '-1' (default: all).",
        show_default=False,
    ),
]
ExpertsOpt = Annotated[
    str | None,
    typer.Option(
        "--experts",
        help="Mixture of experts, router or mlp_out vector: only these experts, e.g. '0,2'.",
        show_default=False,
    ),
]


def check_output_file(path: Path) -> Path:
    """Refuse an output *file* path that is a folder or lies in a missing folder.

    >>> import tempfile, pathlib
    >>> check_output_file(pathlib.Path(tempfile.mkdtemp()))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    steerlab.errors.FileWriteError: cannot write ...: it is a directory, give a file name
    """
    if path.is_dir():
        raise FileWriteError(f"cannot write {path}: it is a directory, give a file name")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileWriteError(f"cannot write {path}: folder {folder} does not exist")
    return path


def check_output_folder(path: Path) -> Path:
    """Refuse an output *folder* path that is an existing file.

    >>> import tempfile, pathlib
    >>> check_output_folder(pathlib.Path(tempfile.mkstemp()[1]))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    steerlab.errors.FileWriteError: cannot write into ...: it is a file, not a folder
    """
    if path.exists() and not path.is_dir():
        raise FileWriteError(f"cannot write into {path}: it is a file, not a folder")
    return path


def parse_numbers(text: str, what: str) -> list[float]:
    """Comma-separated finite numbers of a CLI option (``what`` names it in the error)."""
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise typer.BadParameter(f"{what}: {part!r} is not a number") from None
        if not math.isfinite(value):
            raise typer.BadParameter(f"{what}: {part!r} is not finite")
        values.append(value)
    if not values:
        raise typer.BadParameter(f"{what}: give at least one number")
    return values


def _indices(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",")]
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise InvalidInputError(
            f"{option}: {text!r} is not a comma-separated list of integers, e.g. '1,3'"
        ) from None
    return values


def site_options(
    model: Any, vector: Any, *, site: str | None, heads: str | None, experts: str | None = None
) -> dict[str, Any]:
    """``--site``/``--heads``/``--experts`` as :class:`~steerlab.interventions.Steering`
    options, checked against ``vector`` and ``model`` with errors naming the option.

    >>> import torch
    >>> from steerlab.testing import tiny_model
    >>> from steerlab.vectors import SteeringVector
    >>> vec = SteeringVector({1: torch.ones(32)}, metadata={"site": "head"})
    >>> site_options(tiny_model("llama"), vec, site=None, heads="0,-1")
    {'heads': (0, 3)}
    >>> site_options(tiny_model("llama"), vec, site=None, heads="1;3")
    Traceback (most recent call last):
        ...
    steerlab.errors.InvalidInputError: --heads: '1;3' is not a comma-separated list of ...
    """
    from steerlab.sites import entry_site_options

    return entry_site_options(
        model.adapter,
        vector,
        site=site,
        heads=_indices(heads, "--heads"),
        experts=_indices(experts, "--experts"),
        names=("--site", "--heads", "--experts"),
    )
