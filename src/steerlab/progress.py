"""Progress bars that appear only when someone is watching long work.

Library calls are quiet from scripts, CI logs and pipes: a bar is drawn only when stderr is a
terminal (or in a notebook), the work has more than one step, and it is still running after
two seconds. ``progress=True``/``False`` on the long-running calls forces a bar on or off.

>>> bar = progress_bar(3, "work", False)
>>> bar.disable
True
>>> bar.close()
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["interactive", "progress_bar"]


def interactive() -> bool:
    """True when someone can watch a progress bar: stderr is a terminal, or in a notebook.

    >>> import contextlib, io
    >>> with contextlib.redirect_stderr(io.StringIO()):
    ...     interactive() == ("ipykernel" in sys.modules)
    True
    """
    stream = sys.stderr
    try:
        if stream is not None and stream.isatty():
            return True
    except (AttributeError, ValueError):  # a replaced or closed stream
        pass
    return "ipykernel" in sys.modules


# A bar appears only after the work has run this long, so quick calls never draw one.
_PROGRESS_DELAY_S = 2.0


def progress_bar(total: int, desc: str, enabled: bool | None) -> Any:
    """A tqdm bar over ``total`` steps: ``enabled=None`` shows it on a terminal for long work
    only (more than one step, still running after two seconds); True/False force it.

    >>> import contextlib, io
    >>> with contextlib.redirect_stderr(io.StringIO()):
    ...     bar = progress_bar(10, "means", None)   # stderr is not a terminal: no bar
    >>> bar.disable, bar.total
    (True, 10)
    >>> bar.close()
    """
    from tqdm.auto import tqdm

    if enabled is None:
        show = total > 1 and interactive()
        return tqdm(total=total, desc=desc, disable=not show, leave=False, delay=_PROGRESS_DELAY_S)
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)
