"""Give freed memory back to the system, so a burst of large requests does not raise the floor for good.

glibc keeps what a thread frees in that thread's heap arena for reuse and returns little of it:
after one burst of large image requests (gRPC's buffers, decoded pixels on the decoding threads)
the server stayed at 3.7 GB resident while holding 0.3 GB. Three remedies, all glibc's own:

- `mallopt(M_MMAP_THRESHOLD, 4 MiB)`: every block that large (multi-image messages, large
  images) gets its own mapping and goes back to the system when freed. glibc raises its own
  threshold after the first large block is freed, and from then on such blocks fill the arenas.
  The threshold is not lower because a mapping per request costs: at 128 KiB every 600 KB
  request (one 224x224 FP32 image) was mapped, faulted in and unmapped, and the unmapping
  interrupts the runtime's threads on the other cores. On 2 cores with W18-small-v1 at 224 and
  1 caller that was 27-31 img/s against 32-33 at 4 MiB. Blocks under the threshold come from the
  arenas and are reused under load.
- `mallopt(M_TRIM_THRESHOLD, 16 MiB)`: glibc gives the top of a heap back to the system on a free
  once more than this threshold is free there, 128 KiB once the mmap threshold is set (setting
  it also ends glibc's own adjustment of both). A 600 KB request freed at the top of the heap
  was given back and its pages faulted in and zeroed again for the next one: a front end made
  half a `brk` call per FP32 request under load. With the threshold raised a front end spends
  0.96 CPU ms per FP32 request instead of 1.08-1.17, and 1.96-2.09 per JPEG one instead of
  2.5-2.7 (2-core Intel Xeon, `hrnet bench overhead`). No higher: `malloc_trim` does not give
  back the top of a thread's arena, so each arena may keep this much for good (after a burst of
  large images the server stayed 43% above its floor at 64 MiB, 13% at 16 MiB).
- `malloc_trim(0)` releases the free pages left in every arena. It runs when the server has gone
  quiet, never under load: there the freed memory is about to be reused.

Each process of the server (the owner and every front end) applies all three.
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
TRIM_THRESHOLD = 16 << 20
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3


def _libc_function(name: str) -> Any:
    """A function of glibc, or None where the C library lacks it (musl, macOS)."""
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    try:
        return getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError):
        return None


def configure_allocator(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Blocks of `mmap_threshold` bytes and more get their own mapping from now on, and a heap keeps
    up to `trim_threshold` free bytes at its top (see the module docstring); False where unsupported."""
    mallopt = _libc_function("mallopt")
    return bool(
        mallopt is not None
        and mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        and mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )


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
