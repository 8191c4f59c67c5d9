"""The `hrnet` command and `hrnet demo`: the top layer, which may use every other package."""

from core import __version__

__all__ = ["__version__"]
