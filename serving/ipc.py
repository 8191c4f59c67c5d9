"""What a front-end process and the model owner share: one memory arena and one message link.

The arena is a memfd both processes map. A front end writes a request's model input into a
block of it; the owner reads the rows in place (the batcher copies them into its batch, nothing
else does) and writes the logits back into the same block. Only small control messages travel
over the link, a Unix socket pair: length-prefixed pickles of tuples, never tensor bytes. A
memfd has no name, so nothing is left behind in /dev/shm whichever process dies.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import mmap
import os
import pickle
import socket
import struct
from collections.abc import Callable
from typing import Any

import numpy as np

ALIGN = 64  # block offsets: cache lines, and aligned for every dtype
_LENGTH = struct.Struct("<I")


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class Arena:
    """A shared mapping of `size` bytes over the memfd `fd`; pages are backed only once touched."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self._map = mmap.mmap(fd, size)

    @classmethod
    def create(cls, size: int, name: str) -> Arena:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return cls(fd, size)

    def array(self, offset: int, shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
        return np.ndarray(shape, np.dtype(dtype), buffer=self._map, offset=offset)

    def close(self) -> None:
        """Unmap and close, once: a second close must not hit a descriptor number reused since."""
        if self.fd < 0:
            return
        with contextlib.suppress(BufferError):  # arrays still alive keep the mapping until they go
            self._map.close()
        os.close(self.fd)
        self.fd = -1


class Allocator:
    """First fit over an arena's bytes in ALIGN units; freed blocks merge with their neighbours."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, length), sorted by offset

    def allocate(self, nbytes: int) -> int | None:
        """The offset of a block of `nbytes` (rounded up to ALIGN), or None when none is free."""
        nbytes = aligned(max(nbytes, 1))
        for i, (offset, length) in enumerate(self._free):
            if length >= nbytes:
                if length == nbytes:
                    del self._free[i]
                else:
                    self._free[i] = (offset + nbytes, length - nbytes)
                return offset
        return None

    def free(self, offset: int, nbytes: int) -> None:
        nbytes = aligned(max(nbytes, 1))
        i = bisect.bisect(self._free, (offset, 0))
        if i < len(self._free) and offset + nbytes == self._free[i][0]:  # merge with the next
            nbytes += self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:  # and the previous
            offset, length = self._free.pop(i - 1)
            nbytes += length
            i -= 1
        self._free.insert(i, (offset, nbytes))

    @property
    def free_bytes(self) -> int:
        return sum(length for _, length in self._free)


class Link(asyncio.Protocol):
    """Tuples both ways over a stream socket; `on_message` and `on_closed` run on the event loop."""

    def __init__(self, on_message: Callable[[tuple[Any, ...]], None], on_closed: Callable[[], None]) -> None:
        self._on_message = on_message
        self._on_closed = on_closed
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        view, pos = memoryview(self._buffer), 0
        messages = []
        while len(view) - pos >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(view, pos)
            end = pos + _LENGTH.size + length
            if end > len(view):
                break
            messages.append(pickle.loads(view[pos + _LENGTH.size : end]))
            pos = end
        view.release()
        del self._buffer[:pos]
        for message in messages:
            self._on_message(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._on_closed()

    def send(self, message: tuple[Any, ...]) -> None:
        if self.closed or self._transport is None or self._transport.is_closing():
            return
        body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._transport.write(_LENGTH.pack(len(body)) + body)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def open_link(
    sock: socket.socket, on_message: Callable[[tuple[Any, ...]], None], on_closed: Callable[[], None]
) -> Link:
    loop = asyncio.get_running_loop()
    _, link = await loop.create_unix_connection(lambda: Link(on_message, on_closed), sock=sock)
    return link
