"""HRNet image classification: training, export and gRPC serving."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hrnet")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
