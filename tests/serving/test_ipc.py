"""The front ends' shared arena, its allocator and the record link, on their own."""

from __future__ import annotations

import asyncio
import os
import random
import socket

import numpy as np

from serving.workers import ipc
from serving.workers.ipc import ALIGN, Allocator, Arena, aligned, open_link


def test_allocator_next_fit_aligned_wrapping_and_merging() -> None:
    allocator = Allocator(10 * ALIGN)
    a = allocator.allocate(1)  # rounds up to one ALIGN unit
    b = allocator.allocate(3 * ALIGN)
    c = allocator.allocate(2 * ALIGN)
    assert (a, b, c) == (0, ALIGN, 4 * ALIGN)  # back to back, in order
    assert allocator.allocate(5 * ALIGN) is None  # 4 units left
    allocator.free(b, 3 * ALIGN)
    d = allocator.allocate(2 * ALIGN)
    assert d == 6 * ALIGN  # next fit: after the last block, not in the hole b left
    e = allocator.allocate(2 * ALIGN)
    assert e == 8 * ALIGN  # up to the end of the arena
    assert allocator.allocate(2 * ALIGN) == ALIGN  # then it wraps around to b's hole
    assert allocator.allocate(2 * ALIGN) is None  # one unit left, at 3
    assert allocator.allocate(ALIGN) == 3 * ALIGN
    for offset, nbytes in ((ALIGN, 2 * ALIGN), (3 * ALIGN, ALIGN), (a, 1), (c, 2 * ALIGN), (d, 2 * ALIGN)):
        allocator.free(offset, nbytes)
    allocator.free(e, 2 * ALIGN)  # merges with the free space before it
    assert allocator.free_bytes == 10 * ALIGN
    assert allocator.allocate(10 * ALIGN) == 0


def test_allocator_reuses_the_start_of_the_hole_it_searches_from() -> None:
    """The hole holding the search's start is tried from there first, then whole at the end."""
    allocator = Allocator(4 * ALIGN)
    first = allocator.allocate(2 * ALIGN)
    allocator.free(first, 2 * ALIGN)  # all free again; the search starts at 2 units
    assert allocator.allocate(3 * ALIGN) == 0  # only the whole hole fits it


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


async def test_a_paused_link_leaves_records_unread_until_resumed_then_handles_them_at_once() -> None:
    """The owner pauses its links while a batch waits for company anyway: records sent meanwhile
    stay in the socket, and resuming reads and handles every one of them before it returns."""
    left, right = socket.socketpair()
    got: list[int] = []
    sender = await open_link(left, lambda k, r: None, lambda m: None, lambda: None)
    receiver = await open_link(right, lambda k, r: got.extend(r.tolist()), lambda m: None, lambda: None)
    receiver.pause_reading()
    for request_id in range(5):
        sender.add(ipc.Kind.DONE, request_id)
        await asyncio.sleep(0.01)  # a frame each, as requests come
    assert got == []
    receiver.resume_reading()
    assert got == [0, 1, 2, 3, 4]  # handled before resume_reading returned, in order
    sender.add(ipc.Kind.DONE, 5)  # and read as usual again
    for _ in range(500):
        if got[-1] == 5:
            break
        await asyncio.sleep(0.01)
    assert got == [0, 1, 2, 3, 4, 5]
    sender.close()
    receiver.close()


def test_allocator_never_overlaps_and_fails_only_when_no_hole_fits() -> None:
    """Random allocations and frees, checked against the blocks handed out."""
    for seed in range(60):
        rng = random.Random(seed)
        size = rng.randint(1, 40) * ALIGN
        allocator, live = Allocator(size), {}
        for _ in range(200):
            if live and rng.random() < 0.45:
                offset = rng.choice(list(live))
                allocator.free(offset, live.pop(offset))
                continue
            nbytes = rng.randint(1, 8 * ALIGN)
            offset = allocator.allocate(nbytes)
            if offset is None:
                assert allocator.largest_hole < aligned(nbytes)
                continue
            assert offset % ALIGN == 0 and offset + aligned(nbytes) <= size
            assert all(offset + aligned(nbytes) <= o or o + aligned(n) <= offset for o, n in live.items())
            live[offset] = nbytes
        assert allocator.free_bytes == size - sum(aligned(n) for n in live.values())
