"""Errors raised by steerlab.

Every error steerlab raises for bad input derives from :class:`SteerlabError` *and* from the
builtin a caller would naturally catch (``ValueError``, ``IndexError``, ``FileNotFoundError``),
so ``except ValueError`` keeps working in code written before steerlab.

>>> import steerlab as sl
>>> issubclass(sl.LayerIndexError, sl.SteerlabError) and issubclass(sl.LayerIndexError, IndexError)
True
"""

from __future__ import annotations

__all__ = [
    "BakeError",
    "EditRemovedError",
    "DataError",
    "LayerIndexError",
    "ModelNotAvailableError",
    "SteerlabError",
    "UnsupportedModelError",
    "VectorFileError",
    "VectorFileNotFoundError",
    "VectorMismatchError",
    "InvalidInputError",
]


class SteerlabError(Exception):
    """Base class of every error steerlab raises on purpose."""


class InvalidInputError(SteerlabError, ValueError):
    """An argument has the wrong value: empty prompt list, unknown position mode, bad strength."""


class DataError(SteerlabError, ValueError):
    """A dataset file or built-in set is missing, malformed or empty."""


class LayerIndexError(SteerlabError, IndexError, ValueError):
    """A layer index is outside ``[-n_layers, n_layers)``."""


class VectorMismatchError(SteerlabError, ValueError):
    """A steering vector does not fit the model (hidden size, non-finite values, other model)."""


class VectorFileError(SteerlabError, ValueError):
    """A vector file is truncated, corrupt, or of an unknown schema version."""


class UnsupportedModelError(SteerlabError, ValueError):
    """steerlab cannot find the decoder blocks (or another site) of this model."""


class ModelNotAvailableError(SteerlabError, FileNotFoundError):
    """The requested model cannot be found locally and there is no way to fetch it."""


class VectorFileNotFoundError(VectorFileError, FileNotFoundError):
    """A vector file does not exist (or is a folder)."""


class BakeError(SteerlabError, ValueError):
    """An edit cannot be written into this model's weights (or the result would not load)."""


class EditRemovedError(SteerlabError, RuntimeError):
    """An edited model was used after ``remove()`` (or after its ``with`` block)."""
