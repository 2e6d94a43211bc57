"""Checks every command runs on its output paths before doing any (slow) work."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from steerlab.errors import FileWriteError

__all__ = ["check_output_file", "check_output_folder", "parse_numbers"]


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
