"""`hrnet health` against real servers: SERVING, NOT_SERVING, unknown model, nobody listening."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from clients import Client, ClientError
from hrnet.cli import main


def _dead_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_serving_server_exits_0(grpc_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "--server", grpc_server.address]) == 0
    assert capsys.readouterr().out.strip() == f"{grpc_server.address}: SERVING"
    assert main(["health", "--server", grpc_server.address, "--service", "hrnet"]) == 0


def test_default_server_follows_hrnet_port(
    grpc_server: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HRNET_PORT", grpc_server.address.rpartition(":")[2])
    assert main(["health"]) == 0
    assert capsys.readouterr().out.strip() == f"{grpc_server.address}: SERVING"


def test_not_serving_exits_1_with_one_line(
    start_server: Any, onnx_repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    running = start_server(onnx_repo)
    running.call(running.server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING))
    assert main(["health", "--server", running.address]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"hrnet health: error: {running.address} is NOT_SERVING (loading models or draining)"
    with Client(running.address) as client:  # the library method the command uses says the same
        assert client.serving_status() == "NOT_SERVING"
        assert client.serving_status(service="hrnet") == "SERVING"


def test_unknown_model_and_dead_server_exit_1(grpc_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "--server", grpc_server.address, "--service", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{grpc_server.address} (nope): NOT_FOUND" in err
    dead = _dead_address()
    assert main(["health", "--server", dead, "--timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"hrnet health: error: {dead}: UNAVAILABLE")


def test_bad_flags_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "--server", "127.0.0.1:1,127.0.0.1:2"]) == 2
    assert "one HOST:PORT" in capsys.readouterr().err


def test_client_serving_status_codes(connect: Any, grpc_server: Any) -> None:
    client = connect(grpc_server.address)
    assert client.serving_status() == "SERVING"
    with pytest.raises(ClientError) as info:
        client.serving_status(service="nope")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
