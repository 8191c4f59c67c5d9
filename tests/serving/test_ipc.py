"""The front ends' shared arena, its allocator and the record link, on their own."""

from __future__ import annotations

import asyncio
import os
import socket

import numpy as np

from serving.workers import ipc
from serving.workers.ipc import ALIGN, Allocator, Arena, open_link


def test_allocator_first_fit_aligned_and_merging() -> None:
    allocator = Allocator(10 * ALIGN)
    a = allocator.allocate(1)  # rounds up to one ALIGN unit
    b = allocator.allocate(3 * ALIGN)
    c = allocator.allocate(2 * ALIGN)
    assert (a, b, c) == (0, ALIGN, 4 * ALIGN)
    assert allocator.allocate(5 * ALIGN) is None  # 4 units left
    allocator.free(b, 3 * ALIGN)
    assert allocator.allocate(2 * ALIGN) == ALIGN  # first fit: the hole b left
    allocator.free(ALIGN, 2 * ALIGN)
    allocator.free(a, 1)
    allocator.free(c, 2 * ALIGN)  # merges with the free space before and after it
    assert allocator.free_bytes == 10 * ALIGN
    assert allocator.allocate(10 * ALIGN) == 0


def test_an_arena_is_the_same_memory_in_both_mappings() -> None:
    writer = Arena.create(1 << 20, "hrnet-test")
    reader = Arena(os.dup(writer.fd), writer.size)  # what the front end maps from its inherited fd
    writer.array(ALIGN, (2, 3), np.float32)[...] = [[1, 2, 3], [4, 5, 6]]
    assert reader.array(ALIGN, (2, 3), np.float32).tolist() == [[1, 2, 3], [4, 5, 6]]
    reader.close()
    writer.close()
    writer.close()  # a second close does nothing (its descriptor number may belong to another file)
    assert writer.fd == -1


async def test_link_delivers_records_and_messages_in_order_one_frame_per_run() -> None:
    """Records added in one loop turn travel as one frame per run of a kind, decoded as arrays;
    a control message between two runs keeps its place; a large one spans several reads."""
    left, right = socket.socketpair()
    got: list[tuple] = []
    arrived = asyncio.Event()

    def records(kind: ipc.Kind, array: np.ndarray) -> None:
        got.append((kind, array.tolist()))
        arrived.set()

    def control(message: object) -> None:
        got.append(("control", message))

    sender = await open_link(left, lambda k, r: None, lambda m: None, lambda: None)
    receiver = await open_link(right, records, control, lambda: None)
    submit = (7, 1, 2, 4096, 8192, float("nan"), 3, 12.5)
    big = ipc.Failed([(1, "INVALID_ARGUMENT", "x" * 100_000)])
    sender.add(ipc.Kind.SUBMIT, submit)
    sender.add(ipc.Kind.SUBMIT, (8, *submit[1:]))
    sender.send(big)
    sender.add(ipc.Kind.DONE, 5)
    sender.add(ipc.Kind.DONE, 6)
    sender.add(ipc.Kind.CANCEL, (7, True))
    while not any(item[0] == ipc.Kind.CANCEL for item in got):
        arrived.clear()
        await asyncio.wait_for(arrived.wait(), 10)
    first, second = got[0][1]
    assert got[0][0] == ipc.Kind.SUBMIT and first[:5] == (7, 1, 2, 4096, 8192) and np.isnan(first[5])
    assert first[6:] == (3, 12.5) and second[0] == 8
    assert got[1:] == [("control", big), (ipc.Kind.DONE, [5, 6]), (ipc.Kind.CANCEL, [(7, 1)])]
    sender.close()
    receiver.close()
