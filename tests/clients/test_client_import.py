"""The client installs and runs without the server's or the trainer's heavy dependencies."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

BLOCKED = ("mindspore", "onnxruntime", "cv2", "serving", "training", "onnx", "tritonclient", "grpc_health")

PROBE = textwrap.dedent(
    f"""
    import importlib.abc, sys

    BLOCKED = {BLOCKED!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked: the client must not need it")
            return None

    sys.meta_path.insert(0, Block())

    import clients
    from clients import AsyncClient, Client, ClientError, RetryPolicy, TlsConfig
    from clients import cli, health
    from hrnet.cli import main

    assert main(["health", "--server", "127.0.0.1:1", "--timeout", "1"]) == 1
    assert main(["classify", "--help"]) == 0
    """
)


def test_client_classify_and_health_commands_run_without_heavy_dependencies() -> None:
    # `--help` exits through SystemExit(0) inside argparse; run it as the last statement.
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "IMG_OR_DIR" in result.stdout
    assert "blocked" not in result.stderr


def test_blocker_really_blocks() -> None:
    """The probe would pass vacuously if the finder did not stop imports; prove it does."""
    probe = PROBE.split("import clients")[0] + "import training.model\n"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
    assert "training.model is blocked" in result.stderr or "training is blocked" in result.stderr
