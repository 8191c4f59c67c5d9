"""The embedding API: `serving.Server` started and stopped from user code, sync and async, as the
README shows it (the shared fixtures in tests/conftest.py run every server test through it too)."""

from __future__ import annotations

import json
import socket
import threading
import urllib.request

import numpy as np
import pytest

from clients import AsyncClient, Client
from serving import Server, ServerConfig
from serving.errors import ModelLoadError


def config(repo, **overrides) -> ServerConfig:
    return ServerConfig(repo=str(repo), host="127.0.0.1", port=0, http_port=0, metrics_port=0, **overrides)


def refused(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as sock:
        return sock.connect_ex((host, int(port))) != 0


def has_thread(server: Server) -> bool:
    """Whether the server's background event loop thread is alive."""
    return any(t.name == f"hrnet-server-{id(server):x}" for t in threading.enumerate())


def test_with_statement_runs_the_server_in_a_thread(plain_repo, digit_images) -> None:
    with Server(config(plain_repo)) as server:
        assert has_thread(server)
        with Client(server.address) as client:
            assert client.classify(digit_images[0].png).model_name == "plain"
        with urllib.request.urlopen(f"http://{server.http_address}/v2/models/plain", timeout=10) as reply:
            assert json.loads(reply.read())["name"] == "plain"
        assert server.call(
            server.plane.get("plain").batcher.submit(np.zeros((1, 3, 16, 16), "f4"))
        ).shape == (1, 5)
        addresses = [server.address, server.http_address, f"127.0.0.1:{server.metrics_port}"]
    assert all(refused(a) for a in addresses) and not has_thread(server)


async def test_async_with_runs_on_the_callers_loop(plain_repo, digit_images) -> None:
    async with Server(config(plain_repo)) as server:
        assert not has_thread(server)
        async with AsyncClient(server.address) as client:
            assert (await client.classify(digit_images[1].png)).model_name == "plain"
        address = server.address
    assert refused(address)


def test_start_and_stop_background_from_plain_code(plain_repo) -> None:
    server = Server(config(plain_repo)).start_background()
    try:
        with pytest.raises(RuntimeError, match="already running"):
            server.start_background()
        assert server.plane.ready
    finally:
        assert server.stop_background() is True
    assert server.stop_background() is True  # stopping twice is harmless
    with pytest.raises(RuntimeError, match="not running in the background"):
        server.call(server.plane.drain(0))


def test_a_failed_start_raises_and_leaves_nothing_running(tmp_path) -> None:
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
    server = Server(config(tmp_path))
    with pytest.raises(ModelLoadError, match=r"model\.onnx"):
        server.start_background()
    assert not has_thread(server) and refused(server.address)
