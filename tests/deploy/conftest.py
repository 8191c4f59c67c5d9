"""The deployment files as data: the Dockerfile's stages and the manifests under deploy/.

The tests read the files exactly as shipped and compare them with what the code really does
(the settings the server reads, its ports, its flags), so an image or a manifest cannot drift
from the server unnoticed.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Stage:
    """One `FROM ... AS name` stage: what the image's runtime configuration says."""

    name: str
    base: str
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck_options: dict[str, str] = field(default_factory=dict)
    healthcheck: list[str] = field(default_factory=list)
    expose: list[int] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    user: str = ""


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"expected the JSON (exec) form, got {args}"
    return value


def parse_dockerfile(path: Path) -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for keyword, args in _instructions(path.read_text()):
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else parts[0]
            stage = stages[name] = Stage(name, parts[0])
        elif stage is None:
            continue
        elif keyword == "ENV":
            stage.env.update(dict(part.split("=", 1) for part in shlex.split(args)))
        elif keyword == "ENTRYPOINT":
            stage.entrypoint = _exec_form(args)
        elif keyword == "CMD":
            stage.cmd = _exec_form(args)
        elif keyword == "HEALTHCHECK":
            options, _, command = args.partition(" CMD ")
            stage.healthcheck_options = dict(o.lstrip("-").split("=", 1) for o in options.split())
            stage.healthcheck = _exec_form(command)
        elif keyword == "EXPOSE":
            stage.expose = [int(p.split("/")[0]) for p in args.split()]
        elif keyword == "VOLUME":
            stage.volumes = _exec_form(args)
        elif keyword == "USER":
            stage.user = args
    return stages


@pytest.fixture(scope="session")
def dockerfile() -> dict[str, Stage]:
    """The Dockerfile's stages by name."""
    return parse_dockerfile(REPO / "Dockerfile")


@pytest.fixture(scope="session")
def setting_env_names() -> set[str]:
    """Every HRNET_* variable the server reads: one per leaf of ServerConfig, as core.settings names it.

    The server only logs a variable it does not know (orchestrators add their own), so a typo in
    an image or a manifest would go unnoticed without this list.
    """
    from core.settings import leaves
    from serving.config import ENV_PREFIX, ServerConfig

    return {leaf.variable(ENV_PREFIX) for leaf in leaves(ServerConfig)}
