"""The steerlab version, in a module of its own so that any module can read it.

``steerlab.__version__`` re-exports it; saved vector files and baked models record it, and
those modules import it from here rather than from the package (which imports them).

>>> from steerlab.version import __version__
>>> import steerlab
>>> steerlab.__version__ == __version__
True
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
