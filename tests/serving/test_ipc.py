"""The front ends' shared arena, its allocator and the message link, on their own."""

from __future__ import annotations

import asyncio
import os
import socket

import numpy as np

from serving.ipc import ALIGN, Allocator, Arena, open_link


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


async def test_link_delivers_whole_messages_in_order() -> None:
    left, right = socket.socketpair()
    got: list[tuple] = []
    arrived = asyncio.Event()

    def received(message: tuple) -> None:
        got.append(message)
        if len(got) == 3:
            arrived.set()

    sender = await open_link(left, lambda m: None, lambda: None)
    receiver = await open_link(right, received, lambda: None)
    big = ("infer", 1, "x" * 100_000)  # spans several reads
    for message in (("ack", 0), big, ("done", 2, (3, 10))):
        sender.send(message)
    await asyncio.wait_for(arrived.wait(), 10)
    assert got == [("ack", 0), big, ("done", 2, (3, 10))]
    sender.close()
    receiver.close()
