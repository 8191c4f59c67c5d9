"""Dependencies point one way: each package imports, in full, with every package above it blocked.

Layers, bottom first: `core` (imports nothing of ours), `protos`, then `training`, `serving` and
`clients` side by side (none imports another), `benchmarks`, and `hrnet` (the command and the
demo) on top. A module that reached up or sideways would fail here with the blocked name.

Importing a package runs only its module-level imports, so a second check reads every module's
source and finds every `import` statement, those inside functions included: each must name a
package the layer may import, or be listed in LAZY with why. The one exception today is
`hrnet bench gpu prepare`, which exports W48 (fp32 and fp16) through training's own export and
fp16 conversion, so the GPU run measures the very files `hrnet export` writes; it imports
training inside that function, so the other benchmarks never load MindSpore.
"""

from __future__ import annotations

import ast
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
# Imports allowed inside functions only (never at module level), by module, beyond MAY_IMPORT.
LAZY: dict[str, tuple[str, ...]] = {
    # `hrnet bench gpu prepare`: W48 exported and converted to fp16 as `hrnet export` does it.
    "benchmarks.gpu_serving": ("training",),
    # `hrnet bench tune --val`: fp16 and int8 files made and gated as `hrnet export --precision` does.
    "benchmarks.tune": ("training",),
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


def imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level package, at module level?) for every absolute import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(name.split(".")[0], id(node) in top_level) for name in names]
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_no_import_anywhere_in_the_source_reaches_up(package: str) -> None:
    """The import probe above runs module-level imports only; this reads every import statement,
    those inside functions included, so a lazy import cannot break the layers unseen."""
    wrong = []
    for path in sorted((REPO / package).rglob("*.py")):
        module = module_name(path)
        for name, at_module_level in imports(path):
            if name not in OURS or name == package or name in MAY_IMPORT[package]:
                continue
            if name in LAZY.get(module, ()) and not at_module_level:
                continue
            wrong.append(f"{module} imports {name}" + (" at module level" if at_module_level else ""))
    assert not wrong, f"{package} may import only {MAY_IMPORT[package]}: {wrong}"


def test_every_lazy_exception_is_used() -> None:
    for module, names in LAZY.items():
        path = REPO / (module.replace(".", "/") + ".py")
        used = {name for name, at_module_level in imports(path) if not at_module_level}
        assert set(names) <= used, f"LAZY lists {module} -> {names}, which it no longer imports"


def test_source_scan_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("import core\n\ndef f():\n    from training.export import x\n    import serving.a\n")
    assert imports(source) == [("core", True), ("training", False), ("serving", False)]


# Inside serving, the same rule one level down: the engine knows no protocol and no front end;
# the protocols know no front end (they run in both kinds of process).
SERVING_MAY_NOT = {"serving.engine": ("serving.api", "serving.workers"), "serving.api": ("serving.workers",)}


@pytest.mark.parametrize("subpackage", sorted(SERVING_MAY_NOT))
def test_serving_subpackages_depend_one_way(subpackage: str) -> None:
    wrong = []
    for path in sorted((REPO / subpackage.replace(".", "/")).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            wrong += [
                f"{module_name(path)} imports {name}"
                for name in names
                if name.startswith(SERVING_MAY_NOT[subpackage]) or name in ("serving.server", "serving.cli")
            ]
    assert not wrong, wrong
