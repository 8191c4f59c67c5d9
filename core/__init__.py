"""The ground layer: what every other package shares and which imports nothing of ours.

The model card (`metadata`), atomic file writes, the error types the command line prints, the
typed-settings mechanism and the oneDNN setting live here, so `training`, `serving`, `clients`
and `benchmarks` can use them without importing each other or the `hrnet` command on top.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hrnet")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
