"""Dependencies point one way: each package imports, in full, with every package above it blocked.

Layers, bottom first: `core` (imports nothing of ours), `protos`, then `training`, `serving` and
`clients` side by side (none imports another), `benchmarks`, and `hrnet` (the command and the
demo) on top. A module that reached up or sideways would fail here with the blocked name.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = ("core", "protos", "training", "serving", "clients", "benchmarks", "hrnet")
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "core": (),
    "protos": ("core",),
    "training": ("core",),
    "serving": ("core", "protos"),
    "clients": ("core", "protos"),
    "benchmarks": ("core", "protos", "serving", "clients"),
}

PROBE = textwrap.dedent(
    """
    import importlib, importlib.abc, os, pkgutil, sys

    package, blocked = sys.argv[1], set(sys.argv[2].split(",")) - {""}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise ImportError(f"{name} is blocked: {package} must not import it")
            return None

    sys.meta_path.insert(0, Block())
    root = importlib.import_module(package)
    names = [package] + [
        m.name for m in pkgutil.walk_packages(root.__path__, package + ".")
        if not m.name.endswith("__main__")
    ]
    for name in names:
        importlib.import_module(name)
    print(len(names), "modules;", "ONEDNN_MAX_CPU_ISA" in os.environ)
    """
)


def probe(package: str, blocked: tuple[str, ...]) -> subprocess.CompletedProcess:
    env_isa_unset = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    return subprocess.run(
        [sys.executable, "-c", PROBE, package, ",".join(blocked)],
        cwd=REPO,
        env=env_isa_unset,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_package_imports_with_higher_layers_blocked(package: str) -> None:
    blocked = tuple(p for p in OURS if p != package and p not in MAY_IMPORT[package])
    result = probe(package, blocked)
    assert result.returncode == 0, result.stderr[-3000:]
    count, _, isa_set = result.stdout.strip().rpartition("\n")[-1].partition(" modules; ")
    assert int(count) >= 1
    # Importing a package changes no process setting (the oneDNN cap is set where a network is built).
    assert isa_set == "False"


def test_blocker_really_blocks() -> None:
    """The probe would pass vacuously if the finder did not stop imports: `hrnet.demo` reaches up."""
    result = probe("hrnet", ("training",))
    assert result.returncode != 0
    assert "is blocked: hrnet must not import it" in result.stderr
