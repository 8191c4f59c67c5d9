"""MindSpore's process-wide setup through 2.10's current APIs, so no command prints deprecation
warnings about our own calls, and the one MindSpore prints about its internals is filtered.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import mindspore as ms
from mindspore import log as ms_log


def set_mode_and_device(mode: str, device_target: str) -> None:
    """Graph or PyNative mode, and the device, with `mindspore.set_device` (2.10 deprecates
    `set_context(device_target=...)` and warns on every call).

    `set_device` refuses to run once a kernel has executed, even to name the device already in
    use, so it is called only to change the device.
    """
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    if ms.get_context("device_target") != device_target:
        ms.set_device(device_target)


@contextlib.contextmanager
def without_mindspore_warning(prefix: str) -> Iterator[None]:
    """Drop MindSpore's own log records that start with `prefix` while the block runs.

    For warnings about MindSpore's internals that no call of ours can avoid: `nn.Adam` builds a
    `FusedSparseAdam` primitive (for sparse gradients, which HRNet never has) that 2.10 deprecates.
    MindSpore logs through its own logger, outside `logging`'s root and `warnings`.
    """

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefix)

    logger = ms_log._get_logger()
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)
