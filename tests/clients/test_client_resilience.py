"""Deadlines and retries against real servers that are slow, down, or restarting."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import grpc
import pytest

from clients import Client, ClientError, RetryPolicy


def _dead_address() -> str:
    """A local port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_deadline_exceeded_while_waiting_for_a_batch(
    connect: Any, start_server: Any, onnx_repo: Any, digit_images: list
) -> None:
    # The server holds a lone request for 30 s hoping to batch it; a 0.3 s deadline ends first.
    server = start_server(onnx_repo, max_queue_delay_us=30_000_000, max_batch_size=16, adaptive_delay=False)
    client = connect(server.address)
    started = time.monotonic()
    with pytest.raises(ClientError) as info:
        client.classify(digit_images[0].png, timeout_s=0.3)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # Ends at the deadline (0.3 s); a call that ignored it would end with the 30 s hold. 10 s is
    # 30x the deadline for a loaded machine, and 3x short of the failure.
    assert time.monotonic() - started < 10
    # The client-wide default applies when a call sets none.
    slow = connect(server.address, timeout_s=0.3)
    assert slow.model_metadata().name == "hrnet"  # not batched, so well within 0.3 s
    with pytest.raises(ClientError) as info:
        slow.classify(digit_images[0].png)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_deadline_bounds_all_retries(connect: Any) -> None:
    client = connect(_dead_address(), retry=RetryPolicy(max_attempts=1000, max_backoff_s=0.2))
    started = time.monotonic()
    with pytest.raises(ClientError) as info:
        client.server_ready(timeout_s=1.0)
    elapsed = time.monotonic() - started
    assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    # It did retry (one failed attempt ends in milliseconds: only retrying fills the deadline), and
    # it stopped at the 1 s deadline: retries that ignored it would run ~1000 backoffs of up to
    # 0.2 s, minutes. A slower machine only adds to the lower side; 10 s leaves it 10x the deadline.
    assert 0.5 < elapsed < 10


def test_no_retries_when_switched_off(connect: Any, caplog: pytest.LogCaptureFixture) -> None:
    client = connect(_dead_address(), retry=RetryPolicy.off())
    with caplog.at_level(logging.INFO, logger="clients"), pytest.raises(ClientError) as info:
        client.server_ready()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "retrying" not in caplog.text


def test_a_message_over_the_size_limit_is_not_retried(
    connect: Any, start_server: Any, onnx_repo: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """gRPC reports it as RESOURCE_EXHAUSTED, like a full queue; but resending cannot help."""
    server = start_server(onnx_repo, max_message_mb=1)
    client = connect(server.address)
    with caplog.at_level(logging.INFO, logger="clients"), pytest.raises(ClientError) as info:
        client.classify(b"\x89PNG" + bytes(2 << 20))
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in info.value.message
    assert "retrying" not in caplog.text
    assert not RetryPolicy().retryable(info.value.code, info.value.message)
    assert RetryPolicy().retryable(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full: 256 image(s) queued")


@pytest.mark.slow  # ~3 s each, 4 of them: a server stopped and started again
@pytest.mark.parametrize("rpc", ["server_ready", "classify"])
def test_calls_ride_out_a_server_restart(
    rpc: str,
    connect: Any,
    start_server: Any,
    onnx_repo: Any,
    digit_images: list,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = start_server(onnx_repo)
    port = first.server.port
    policy = RetryPolicy(max_attempts=40, initial_backoff_s=0.05, max_backoff_s=0.3)
    client = connect(first.address, retry=policy, timeout_s=20)

    def call() -> object:
        return client.server_ready() if rpc == "server_ready" else client.classify(digit_images[1].png).index

    expected = call()
    results: list[object] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def keep_classifying() -> None:
        while not done.is_set():
            try:
                results.append(call())
            except BaseException as exc:
                errors.append(exc)
                return

    with caplog.at_level(logging.INFO, logger="clients"):
        worker = threading.Thread(target=keep_classifying)
        worker.start()
        while len(results) < 3:
            time.sleep(0.01)
        first.stop(grace_s=0.5)
        # With nobody listening, a call without retries fails at once ...
        with Client(first.address, retry=RetryPolicy.off()) as once, pytest.raises(ClientError) as info:
            once.server_ready()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        time.sleep(0.5)
        before_restart = len(results)
        second = start_server(onnx_repo, port=port)  # same port, new process state
        deadline = time.monotonic() + 20
        while len(results) < before_restart + 3 and not errors and time.monotonic() < deadline:
            time.sleep(0.01)
        done.set()
        worker.join(30)
    assert not errors, errors
    assert len(results) >= before_restart + 3
    # A server that is up but still loading answers ServerReady with False: still an answer.
    assert set(results) - {False} == {expected}
    assert "UNAVAILABLE" in caplog.text and "retrying" in caplog.text
    assert second.server.port == port
