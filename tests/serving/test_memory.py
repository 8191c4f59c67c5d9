"""The allocator settings every server process makes (serving/memory.py), in fresh processes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from serving.memory import _libc_function

# Allocates and frees one 600 KB block (a 224x224 FP32 image) 200 times, writing it each time,
# and prints the minor page faults that took: each fault is a page given back and taken again.
CYCLES = """
import ctypes, resource, sys
import numpy as np
from serving.memory import MMAP_THRESHOLD, configure_allocator, _libc_function
if sys.argv[1] == "configured":
    assert configure_allocator()
else:  # the mmap threshold alone, as the owner set it before: the trim threshold drops to 128 KiB
    assert _libc_function("mallopt")(-3, MMAP_THRESHOLD)
for _ in range(5):
    np.ones(150_528, np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    np.ones(150_528, np.float32)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(_libc_function("mallopt") is None, reason="glibc's mallopt is not available here")
def test_a_freed_request_buffer_stays_with_the_process_until_it_is_quiet() -> None:
    """With the trim threshold raised, a block freed at the top of the heap is kept for the next
    request; with only the mmap threshold set, glibc gave it back and faulted it in again each time."""

    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", CYCLES, mode], capture_output=True, text=True, check=True)
        return int(out.stdout)

    assert faults("configured") < 200  # under one page per cycle
    assert faults("mmap-threshold-only") > 200 * 50  # about 115 of its 147 pages per cycle
