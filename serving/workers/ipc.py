"""What a front-end process and the model owner share: one memory arena and one message link.

The arena is a memfd both processes map. A front end writes a request's checked model input into
a block of it; the owner's batcher copies the rows from there into its batch and the owner writes
the logits back into the same block. A memfd has no name, so nothing is left behind in /dev/shm
whichever process dies.

The link is a Unix socket pair carrying frames of four kinds. The hot path is records, not
messages: a request is one fixed-size `SUBMIT` record (its id, model slot, rows, where its block
is, deadline, priority, arrival), an answer one `DONE` id, a withdrawal one `CANCEL` record. Each
side collects what it has to send during one turn of its event loop and writes it in one frame
per run of a kind, so ten requests cost one write and one read, and the receiver decodes them
with one `np.frombuffer`, no pickling per request. Everything rare (configuration, the model
catalog, acknowledgements, error messages) is a `CONTROL` frame holding one of the small
dataclasses below, pickled.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import enum
import mmap
import os
import pickle
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

ALIGN = 64  # block offsets: cache lines, and aligned for every dtype
HEADER = struct.Struct("<IB")  # body length, kind
RECEIVE_BYTES = 1 << 16


class Kind(enum.IntEnum):
    SUBMIT = 1  # front end -> owner: SUBMIT records
    DONE = 2  # owner -> front end: ids whose logits are in their blocks
    CANCEL = 3  # front end -> owner: CANCEL records
    CONTROL = 4  # either way: one pickled message dataclass


# A request handed to the owner. deadline: absolute time.monotonic() (the clock is system-wide),
# NaN for none; its input is (rows, 3, S, S) of the model's input dtype at `offset`, its logits
# go to `output`, which may be `offset` itself: they are written once the batch has read the input.
SUBMIT = np.dtype(
    [
        ("id", "<u8"),
        ("slot", "<u4"),
        ("rows", "<u4"),
        ("offset", "<u8"),
        ("output", "<u8"),
        ("deadline", "<f8"),
        ("priority", "<u8"),
        ("arrived", "<f8"),
    ]
)
DONE = np.dtype("<u8")
# expired: the request's deadline passed (DEADLINE_EXCEEDED if still queued); else its caller left.
CANCEL = np.dtype([("id", "<u8"), ("expired", "u1")])
RECORDS = {Kind.SUBMIT: SUBMIT, Kind.DONE: DONE, Kind.CANCEL: CANCEL}


# --- control messages: owner -> front end ---------------------------------------------------


@dataclass(frozen=True)
class Configure:
    config: Any  # serving.config.ServerConfig
    owner_address: str
    port: int
    arena_size: int


@dataclass(frozen=True)
class Catalog:
    """The models a front end routes to (serving.engine.service.ModelView), acknowledged with Ack(seq)."""

    seq: int
    models: list[Any]


@dataclass(frozen=True)
class Regions:
    """The registered shared-memory regions, as (name, key, offset, byte_size); acknowledged."""

    seq: int
    regions: list[tuple[str, str, int, int]]


@dataclass(frozen=True)
class Drain:
    """Take no new requests; acknowledge once every accepted one is handed over."""

    seq: int


@dataclass(frozen=True)
class Stop:
    grace_s: float


@dataclass(frozen=True)
class Failed:
    """Requests that end in an error (or were cancelled by the server): (id, status code, message)."""

    answers: list[tuple[int, str, str]]


# --- control messages: front end -> owner ---------------------------------------------------


@dataclass(frozen=True)
class Listening:
    pass


@dataclass(frozen=True)
class StartFailed:
    reason: str


@dataclass(frozen=True)
class Ack:
    seq: int


@dataclass(frozen=True)
class Refused:
    """A request the front end refused before handing it over, for the model's statistics."""

    model: str
    version: str
    code: str
    seconds: float


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
        return np.ndarray(shape, dtype, buffer=self._map, offset=offset)

    def close(self) -> None:
        """Unmap and close, once: a second close must not hit a descriptor number reused since."""
        if self.fd < 0:
            return
        with contextlib.suppress(BufferError):  # arrays still alive keep the mapping until they go
            self._map.close()
        os.close(self.fd)
        self.fd = -1


class Allocator:
    """Next fit over an arena's bytes in ALIGN units; freed blocks merge with their neighbours.

    Next fit, not first fit: the search starts where the last block ended and wraps around, so
    blocks allocated one after the other lie back to back, as a ring would place them, and a
    batch of consecutive requests is one span the model reads in place (backends.base.run).
    First fit put each new block in the earliest hole, wherever that was.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, length), sorted by offset
        self._next = 0  # where the last block ended: the search starts here

    def allocate(self, nbytes: int) -> int | None:
        """The offset of a block of `nbytes` (rounded up to ALIGN), or None when none is free."""
        nbytes = aligned(max(nbytes, 1))
        holes = len(self._free)
        if not holes:
            return None
        start = bisect.bisect(self._free, (self._next, -1))
        if start and sum(self._free[start - 1]) > self._next:  # the hole that holds `_next`
            start -= 1
        for j in range(start, start + holes + 1):  # the start hole twice: from `_next`, then whole
            i = j % holes
            offset, length = self._free[i]
            skip = max(0, self._next - offset) if j == start else 0  # from `_next` on, in its hole
            if length - skip < nbytes:
                continue
            pieces = [(offset, skip)] if skip else []
            if length - skip > nbytes:
                pieces.append((offset + skip + nbytes, length - skip - nbytes))
            self._free[i : i + 1] = pieces
            self._next = offset + skip + nbytes
            return offset + skip
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

    @property
    def largest_hole(self) -> int:
        return max((length for _, length in self._free), default=0)


RecordHandler = Callable[[Kind, np.ndarray], None]


class Link:
    """Records and control messages both ways over a stream socket, sent once per loop turn.

    `on_records(kind, array)`, `on_control(message)` and `on_closed()` run on the event loop.
    Order is kept: frames go out in the order their first item was added.

    The socket is read and written here, with the loop's add_reader and add_writer, not through
    a transport: pausing a uvloop transport leaves its socket in epoll until the next byte
    arrives, which wakes the loop only to take it out, once per link and pause, and the model
    owner pauses its links for every batch (`pause_reading`). remove_reader takes it out at once.
    """

    def __init__(
        self,
        sock: socket.socket,
        on_records: RecordHandler,
        on_control: Callable[[Any], None],
        on_closed: Callable[[], None],
    ) -> None:
        self._on_records = on_records
        self._on_control = on_control
        self._on_closed = on_closed
        # Kept: asyncio.get_running_loop() makes a getpid() system call each time (its fork check
        # in Python 3.11), about 0.1 us here, and `add` runs once per request.
        self.loop = asyncio.get_running_loop()
        sock.setblocking(False)
        self._sock = sock
        self._buffer = bytearray()  # received bytes not yet a whole frame
        self._unsent = bytearray()  # frames the socket had no room for yet
        self._outgoing: list[tuple[Kind, list[Any]]] = []  # (kind, records) or (CONTROL, [message])
        self._flush_scheduled = False
        self._reading = False
        self._closing = False  # close() was called: the socket closes once `_unsent` is out
        self.closed = False

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        view, pos = memoryview(self._buffer), 0
        frames: list[tuple[int, bytes]] = []
        while len(view) - pos >= HEADER.size:
            length, kind = HEADER.unpack_from(view, pos)
            end = pos + HEADER.size + length
            if end > len(view):
                break
            frames.append((kind, bytes(view[pos + HEADER.size : end])))
            pos = end
        view.release()
        del self._buffer[:pos]
        for kind, body in frames:
            if kind == Kind.CONTROL:
                self._on_control(pickle.loads(body))
            else:
                records = Kind(kind)
                self._on_records(records, np.frombuffer(body, RECORDS[records]))

    def pause_reading(self) -> None:
        """Leave what the other side sends in the socket until `resume_reading` (the model owner,
        while its batches wait: serving.engine.batcher.Batcher._hold)."""
        if self._reading:
            self._reading = False
            self.loop.remove_reader(self._sock)

    def resume_reading(self) -> None:
        """Read again; what arrived while paused is read and handled before this returns, so the
        caller decides with every record that came."""
        if not self._reading and not self._closing and not self.closed:
            self._read()
            if not self.closed:
                self._reading = True
                self.loop.add_reader(self._sock, self._read)

    def _read(self) -> None:
        """Everything the socket holds now, handed to `data_received`; EOF or an error closes."""
        while not self.closed:
            try:
                data = self._sock.recv(RECEIVE_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._lost()
                return
            if not data:
                self._lost()
                return
            self.data_received(data)
            if len(data) < RECEIVE_BYTES:  # a short read: nothing more was waiting
                return

    def add(self, kind: Kind, record: Any) -> None:
        """Queue one record (a tuple of the kind's fields; an int for DONE) for this loop turn."""
        if self._outgoing and self._outgoing[-1][0] == kind:
            self._outgoing[-1][1].append(record)
        else:
            self._outgoing.append((kind, [record]))
        self._schedule()

    def send(self, message: Any) -> None:
        """Queue one control message (a dataclass of this module) for this loop turn."""
        self._outgoing.append((Kind.CONTROL, [message]))
        self._schedule()

    def _schedule(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        outgoing, self._outgoing = self._outgoing, []
        if self.closed or self._closing or not outgoing:
            return
        chunks = []
        for kind, items in outgoing:
            if kind == Kind.CONTROL:
                body = pickle.dumps(items[0], protocol=pickle.HIGHEST_PROTOCOL)
            else:
                body = np.array(items, RECORDS[kind]).tobytes()
            chunks += [HEADER.pack(len(body), kind), body]
        self._write(b"".join(chunks))

    def _write(self, data: bytes) -> None:
        if self._unsent:  # waiting for room already: behind what waits
            self._unsent += data
            return
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._lost()
            return
        if sent < len(data):
            self._unsent += data[sent:]
            self.loop.add_writer(self._sock, self._writable)

    def _writable(self) -> None:
        try:
            sent = self._sock.send(self._unsent)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._lost()
            return
        del self._unsent[:sent]
        if not self._unsent:
            self.loop.remove_writer(self._sock)
            if self._closing:
                self._lost()

    def close(self) -> None:
        """Close once what was flushed is sent; `on_closed` runs soon after, as for a transport."""
        self.flush()
        if self.closed or self._closing:
            return
        self._closing = True
        self.pause_reading()
        if not self._unsent:
            self.loop.call_soon(self._lost)

    def _lost(self) -> None:
        """The link is closed (by either side, or an error): release the socket, tell `on_closed` once."""
        if self.closed:
            return
        self.closed = True
        self._reading = False
        for remove in (self.loop.remove_reader, self.loop.remove_writer):
            with contextlib.suppress(ValueError, OSError, RuntimeError):  # the loop may be closed
                remove(self._sock)
        self._sock.close()
        self._on_closed()


async def open_link(
    sock: socket.socket,
    on_records: RecordHandler,
    on_control: Callable[[Any], None],
    on_closed: Callable[[], None],
) -> Link:
    link = Link(sock, on_records, on_control, on_closed)
    link.resume_reading()
    return link
