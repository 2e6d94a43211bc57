"""Old spellings that still work for one release, with a warning that names the new one.

Every deprecated argument goes through :func:`warn_deprecated`, so the warnings share one class
(:class:`SteerlabDeprecationWarning`, a ``DeprecationWarning``), one wording and one rule for
where they point: at the first caller outside steerlab, whichever internal function forwarded the
argument. ``docs/migrating.md`` lists every spelling that warns.

>>> import warnings
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     warn_deprecated("activations(positions=...)", "activations(read_at=...)")
>>> print(caught[0].message)  # doctest: +NORMALIZE_WHITESPACE
activations(positions=...) is deprecated and will be removed in steerlab 0.3; write
activations(read_at=...) instead
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

from steerlab.errors import InvalidInputError

__all__ = [
    "SteerlabDeprecationWarning",
    "loose_steering_keywords",
    "renamed_keyword",
    "warn_deprecated",
]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


class SteerlabDeprecationWarning(DeprecationWarning):
    """A steerlab spelling that is going away; the message names the one to use instead.

    Its own class so that a test suite can turn exactly these into errors
    (``-W error::steerlab.deprecation.SteerlabDeprecationWarning``).
    """


def _outside_level() -> int:
    """``stacklevel`` (for a ``warnings.warn`` called by this module) of the first frame outside
    the steerlab package: the user's line, not the internal call that forwarded the argument."""
    frame = sys._getframe(1)  # the caller of this function: warn_deprecated, level 1
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    return level


def warn_deprecated(old: str, new: str) -> None:
    """Warn that ``old`` (a spelling, e.g. ``"generate(strength=...)"``) is deprecated for
    ``new``, pointing at the first caller outside steerlab (see the module example)."""
    warnings.warn(
        f"{old} is deprecated and will be removed in steerlab 0.3; write {new} instead",
        SteerlabDeprecationWarning,
        stacklevel=_outside_level(),
    )


def loose_steering_keywords(call: str, **given: Any) -> None:
    """Warn once for the loose steering keywords (``strength``, ``positions``, ``layers``, ``op``,
    ``when``) given to ``call``, a call that takes them only inside ``steering=``.

    Keywords left at ``None`` were not given and do not warn.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     loose_steering_keywords("generate", strength=2.0, positions=None, op="cap")
    >>> print(caught[0].message)  # doctest: +NORMALIZE_WHITESPACE
    generate(strength=..., op=...) is deprecated and will be removed in steerlab 0.3; write
    generate(steering=sl.Steering(vector, strength=..., op=...)) instead
    """
    names = [name for name, value in given.items() if value is not None]
    if not names:
        return
    spelled = ", ".join(f"{name}=..." for name in names)
    warn_deprecated(f"{call}({spelled})", f"{call}(steering=sl.Steering(vector, {spelled}))")


def renamed_keyword(
    call: str, *, old: str, new: str, old_value: Any, new_value: Any, default: Any
) -> Any:
    """The value of keyword ``new`` of ``call``, accepting its deprecated spelling ``old`` (with
    a warning); ``default`` when neither is given. Both at once is a mistake and raises
    :class:`~steerlab.errors.InvalidInputError` naming them.

    >>> renamed_keyword("scan_layers", old="positions", new="read_at", old_value=None,
    ...                 new_value="mean", default="last")
    'mean'
    """
    if old_value is None:
        return default if new_value is None else new_value
    if new_value is not None:
        raise InvalidInputError(
            f"{call}() got both {new}= and {old}=; give {new}= only ({old}= is its old spelling)"
        )
    warn_deprecated(f"{call}({old}=...)", f"{call}({new}=...)")
    return old_value
