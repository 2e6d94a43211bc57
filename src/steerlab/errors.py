"""Errors raised by steerlab.

The taxonomy, by what went wrong:

* a bad argument value or type → :class:`InvalidInputError` (``ValueError``); a layer index
  out of range → :class:`LayerIndexError` (``IndexError`` and ``ValueError``); a layer a vector
  does not have → :class:`LayerNotFoundError` (``KeyError``)
* a vector that does not fit a model or another vector → :class:`VectorMismatchError`
* a file that cannot be read (corrupt, tampered with, wrong format) → :class:`VectorFileError`,
  or :class:`VectorFileNotFoundError` (``FileNotFoundError``) when it is not there
* a file that cannot be written (a folder in the way, no permission, disk full) →
  :class:`FileWriteError` (``OSError``), naming the target, never a hidden temporary file
* models and data: :class:`UnsupportedModelError`, :class:`ModelNotAvailableError`,
  :class:`DataError`, :class:`BakeError`, :class:`EditRemovedError`
* too little free memory for an engine's requested sizes → :class:`InsufficientMemoryError`
  (``MemoryError``), naming the setting to change

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
    "FileWriteError",
    "InsufficientMemoryError",
    "LayerNotFoundError",
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
    """A vector (or means, or GGUF) file is truncated, corrupt, tampered with (checksum), or of
    an unknown schema version."""


class LayerNotFoundError(SteerlabError, KeyError):
    """A steering vector has no direction for the requested layer (``vec[99]``)."""

    def __str__(self) -> str:
        # KeyError would show the repr of the message, quotes and all
        return str(self.args[0]) if self.args else ""


class FileWriteError(SteerlabError, OSError):
    """A file or folder cannot be written: a folder is in the way, no permission, disk full."""


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


class InsufficientMemoryError(SteerlabError, MemoryError):
    """Too little free memory to start an engine with the requested sizes (names the setting)."""
