"""The system shared-memory extension: tensors passed by reference in client-owned shared memory.

A client on the same host creates a POSIX shared-memory object (`shm_open`, e.g. tritonclient's
`create_shared_memory_region`), registers a window of it under a name, and then sends inputs
and receives outputs by reference (the tensor parameters `shared_memory_region`,
`shared_memory_offset`, `shared_memory_byte_size`) instead of inside the messages.

Clients are not trusted. A key names an object directly under /dev/shm (no paths, no links,
regular files only); a registered window must lie inside the object; every reference must lie
inside its window; a read is limited like a message. Data moves with pread/pwrite on a
descriptor rather than through a memory map, so a client that shrinks its object after
registering it fails its own request with INVALID_ARGUMENT instead of killing the server with
SIGBUS. Unregistering drops the registry's reference only: requests that already resolved the
region finish with it, and its descriptor closes when the last of them is done (Triton defers
unregistration the same way).
"""

from __future__ import annotations

import logging
import os
import re
import stat
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.errors import AlreadyExists, InvalidArgument, NotFound

log = logging.getLogger(__name__)
SHM_DIR = Path("/dev/shm")  # where Linux keeps shm_open's objects
# shm_open's portable form: an optional leading "/" and one path component.
KEY = re.compile(r"^/?(?!\.{1,2}$)[^/\x00]{1,255}$")


@dataclass(frozen=True)
class RegionInfo:
    """A registration as the client made it: `byte_size` bytes of object `key` from `offset`."""

    name: str
    key: str
    offset: int
    byte_size: int


@dataclass(frozen=True)
class ShmRef:
    """A tensor's reference into a region: `byte_size` bytes from `offset` within the window."""

    region: str
    offset: int
    byte_size: int


class Region:
    """One registered window with its own descriptor, closed when the last user lets go."""

    def __init__(self, info: RegionInfo) -> None:
        if not info.name:
            raise InvalidArgument("a shared memory region needs a name")
        if not KEY.match(info.key):
            raise InvalidArgument(
                f"shared memory key {info.key!r} must name one object directly under {SHM_DIR} "
                "(e.g. '/input0'): no further '/', not '.' or '..'"
            )
        if info.byte_size < 1:
            raise InvalidArgument(f"shared memory region {info.name!r}: byte_size must be >= 1")
        path = SHM_DIR / info.key.lstrip("/")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise InvalidArgument(
                f"unable to open shared memory object {info.key!r}: {exc.strerror}"
            ) from None
        self.info = info
        self.fd = fd
        self._closer = weakref.finalize(self, os.close, fd)
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            self._closer()
            raise InvalidArgument(f"shared memory key {info.key!r} is not a shared memory object")
        if info.offset + info.byte_size > status.st_size:
            self._closer()
            raise InvalidArgument(
                f"shared memory region {info.name!r}: offset {info.offset} + byte_size {info.byte_size} "
                f"exceeds the {status.st_size} bytes of {info.key!r}"
            )

    def read(self, ref: ShmRef) -> np.ndarray:
        """The referenced bytes, copied out once (pread: a shrunken object cannot fault us)."""
        buffer = np.empty(ref.byte_size, dtype=np.uint8)
        done = 0
        while done < ref.byte_size:
            got = os.preadv(self.fd, [buffer[done:]], self.info.offset + ref.offset + done)
            if got == 0:
                raise InvalidArgument(
                    f"shared memory region {ref.region!r}: only {done} of {ref.byte_size} bytes could "
                    f"be read at offset {ref.offset}; the object shrank after it was registered"
                )
            done += got
        return buffer

    def write(self, ref: ShmRef, data: np.ndarray) -> None:
        view = memoryview(np.ascontiguousarray(data)).cast("B")
        if view.nbytes > ref.byte_size:
            raise InvalidArgument(
                f"shared memory region {ref.region!r}: {view.nbytes} bytes do not fit its {ref.byte_size}"
            )
        done = 0
        while done < view.nbytes:
            done += os.pwrite(self.fd, view[done:], self.info.offset + ref.offset + done)


class SharedMemoryRegistry:
    """The regions registered on this server, by name."""

    def __init__(self, max_read_bytes: int) -> None:
        self.max_read_bytes = max_read_bytes
        self._regions: dict[str, Region] = {}

    def register(self, info: RegionInfo) -> None:
        if info.name in self._regions:
            raise AlreadyExists(f"shared memory region {info.name!r} is already registered")
        self._regions[info.name] = Region(info)

    def unregister(self, name: str = "") -> None:
        """Forget `name` (every region when empty); an unknown name is not an error, as in Triton."""
        if name:
            self._regions.pop(name, None)
        else:
            self._regions.clear()

    def status(self, name: str = "") -> list[RegionInfo]:
        if not name:
            return [region.info for region in self._regions.values()]
        return [self._get(name).info]

    def mirror(self, infos: list[RegionInfo]) -> None:
        """Hold exactly `infos` (another process's registry), reopening only what changed."""
        regions: dict[str, Region] = {}
        for info in infos:
            current = self._regions.get(info.name)
            if current is not None and current.info == info:
                regions[info.name] = current
                continue
            try:
                regions[info.name] = Region(info)
            except InvalidArgument as exc:  # gone since the owner checked it: requests get NOT_FOUND
                log.warning("region not mirrored", extra={"region": info.name, "error": str(exc)})
        self._regions = regions

    def resolve(self, ref: ShmRef, what: str) -> Region:
        """The region `ref` points into, after checking that `ref` lies inside its window."""
        region = self._get(ref.region)
        window = region.info.byte_size
        if ref.offset < 0 or ref.byte_size < 0 or ref.offset + ref.byte_size > window:
            raise InvalidArgument(
                f"{what}: shared_memory_offset {ref.offset} + shared_memory_byte_size {ref.byte_size} "
                f"lies outside region {ref.region!r} of {window} bytes"
            )
        return region

    def read(self, ref: ShmRef, what: str) -> np.ndarray:
        region = self.resolve(ref, what)
        if ref.byte_size > self.max_read_bytes:
            raise InvalidArgument(
                f"{what}: {ref.byte_size} bytes of shared memory exceed the server's message limit of "
                f"{self.max_read_bytes}"
            )
        return region.read(ref)

    def _get(self, name: str) -> Region:
        region = self._regions.get(name)
        if region is None:
            raise NotFound(f"unable to find system shared memory region {name!r}")
        return region
