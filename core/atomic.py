"""Atomic file writes: a reader sees the old file or the complete new one, never half of one.

The file gets the mode an ordinary `open(path, "w")` would give it (0666 less the umask), not
the 0600 of a temporary file nor the 0400 MindSpore gives its checkpoints and MINDIR files: a
server running as another user (a container's non-root user reading a mounted repository) must
be able to read what training and export wrote.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on clean exit it is fsynced and renamed onto it.

    The temporary file lives in the target's folder so the final `os.replace` is a same-filesystem
    rename, which POSIX makes atomic. On any exception the temporary file is removed and the
    target is untouched.
    """
    target = Path(target)
    if not overwrite and target.exists():
        raise FileExistsError(f"{target} exists (pass --force to overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (another thread may be
    creating files); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(target: str | Path, text: str, overwrite: bool = True) -> None:
    with atomic_path(target, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
