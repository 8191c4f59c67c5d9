"""Atomic writes keep the old file until the new one is complete, and respect the umask."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.atomic import atomic_path, atomic_write_text, current_umask


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_get_the_umask_mode_not_the_temporary_files(tmp_path: Path, umask_022: None) -> None:
    target = tmp_path / "config.yaml"
    atomic_write_text(target, "a: 1\n")
    assert _mode(target) == 0o644
    assert current_umask() == 0o022


def test_a_read_only_file_written_inside_is_made_readable(tmp_path: Path, umask_022: None) -> None:
    """MindSpore chmods checkpoints and MINDIR files to 0400 as it writes them."""
    target = tmp_path / "model.ckpt"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"weights")
        os.chmod(tmp, 0o400)
    assert _mode(target) == 0o644
    assert target.read_bytes() == b"weights"


def test_a_stricter_umask_is_respected(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        atomic_write_text(tmp_path / "secret.txt", "x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "secret.txt") == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "best.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json"]
