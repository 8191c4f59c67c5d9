"""Give freed memory back to the system, so a burst of large requests does not raise the floor for good.

glibc keeps what a thread frees in that thread's heap arena for reuse and returns little of it:
after one burst of large image requests (gRPC's buffers, decoded pixels on the decoding threads)
the server stayed at 3.7 GB resident while holding 0.3 GB. Two remedies, both glibc's own:

- `mallopt(M_MMAP_THRESHOLD, 4 MiB)`: every block that large (multi-image messages, large
  images) gets its own mapping and goes back to the system when freed. glibc raises its own
  threshold after the first large block is freed, and from then on such blocks fill the arenas.
  The threshold is not lower because a mapping per request costs: at 128 KiB every 600 KB
  request (one 224x224 FP32 image) was mapped, faulted in and unmapped, and the unmapping
  interrupts the runtime's threads on the other cores. On 2 cores with W18-small-v1 at 224 and
  1 caller that was 27-31 img/s against 32-33 at 4 MiB. Blocks under the threshold come from the
  arenas and are reused under load.
- `malloc_trim(0)` releases the free pages left in every arena. It runs when the server has gone
  quiet, never under load: there the freed memory is about to be reused.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)
TRIM_INTERVAL_S = 1.0
MMAP_THRESHOLD = 4 << 20  # see the module docstring
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def _libc_function(name: str) -> Any:
    """A function of glibc, or None where the C library lacks it (musl, macOS)."""
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    try:
        return getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError):
        return None


def map_large_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """Blocks of `threshold` bytes and more get their own mapping from now on; False where unsupported."""
    mallopt = _libc_function("mallopt")
    return bool(mallopt is not None and mallopt(_M_MMAP_THRESHOLD, threshold))


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none."""
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
    return trim


async def trim_when_quiet(
    activity: Callable[[], tuple[int, int]], interval_s: float = TRIM_INTERVAL_S
) -> None:
    """Every `interval_s`, trim the heap if no request is running and some finished since the last trim.

    `activity()` returns (requests running, requests finished so far). Runs until cancelled.
    """
    trim = malloc_trim()
    if trim is None:
        log.info("malloc_trim is not available: freed memory stays with the process")
        return
    trimmed_at = -1
    while True:
        await asyncio.sleep(interval_s)
        running, finished = activity()
        if running == 0 and finished != trimmed_at:
            trimmed_at = finished
            await asyncio.to_thread(trim, 0)
