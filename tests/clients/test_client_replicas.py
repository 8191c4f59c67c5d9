"""One client, several replicas: calls spread over them and survive one stopping mid-run."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from clients import TlsConfig
from clients.channel import parse_target
from hrnet.cli import main

IMAGES = "hrnet_inference_images_total"


@pytest.mark.slow  # ~5 s each: two servers, 240 calls, a graceful stop
def test_one_replica_stops_mid_run_and_no_call_fails(
    connect: Any, start_server: Any, onnx_repo: Path, digit_images: list
) -> None:
    first, second = start_server(onnx_repo), start_server(onnx_repo)
    client = connect([first.address, second.address], timeout_s=20)
    expected = {i: client.classify(digit_images[i].png).index for i in range(4)}
    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    calls_per_worker = 60
    stopped = threading.Event()

    def work(worker: int) -> None:
        for n in range(calls_per_worker):
            if n == calls_per_worker - 5:  # the last 5 calls come after the stop, however fast the rest
                stopped.wait(60)
            i = (worker + n) % 4
            try:
                results.append((i, client.classify(digit_images[i].png).index))
            except BaseException as exc:
                errors.append(exc)
                return

    workers = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 60
    while len(results) < 40 and not errors and time.monotonic() < deadline:
        time.sleep(0.005)
    served_before = first.metric(IMAGES), second.metric(IMAGES)
    # Health NOT_SERVING, new calls refused with UNAVAILABLE, in-flight ones finish. Calls that
    # reach it in that window fail (with RetryPolicy.off() this test does fail); retried, they
    # go to the other replica.
    first.stop(grace_s=2.0)
    second_at_stop = second.metric(IMAGES)
    stopped.set()
    for worker in workers:
        worker.join(60)
    assert not errors, errors
    assert len(results) == 4 * calls_per_worker
    assert all(index == expected[i] for i, index in results)
    # Both replicas took calls before the stop; afterwards the remaining one took the rest.
    assert min(served_before) > 0, served_before
    assert second.metric(IMAGES) >= second_at_stop + 4 * 5


def test_unhealthy_replica_gets_no_calls(
    connect: Any, start_server: Any, onnx_repo: Path, digit_images: list
) -> None:
    from grpc_health.v1 import health_pb2

    first, second = start_server(onnx_repo), start_server(onnx_repo)
    client = connect(f"{first.address},{second.address}")
    for _ in range(8):
        client.classify(digit_images[0].png)
    assert first.metric(IMAGES) > 0 and second.metric(IMAGES) > 0
    first.call(first.server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING))
    # The Watch stream delivers the change when it does (no fixed pause: a loaded machine may take
    # longer): until then round robin sends one call of every two to `first`.
    deadline = time.monotonic() + 20
    while True:
        before = first.metric(IMAGES), second.metric(IMAGES)
        for _ in range(2):
            client.classify(digit_images[0].png)
        if first.metric(IMAGES) == before[0]:
            break
        assert time.monotonic() < deadline, "the client kept calling the NOT_SERVING replica"
    before = first.metric(IMAGES), second.metric(IMAGES)
    for _ in range(10):
        client.classify(digit_images[0].png)
    assert first.metric(IMAGES) == before[0]
    assert second.metric(IMAGES) == before[1] + 10


def test_dns_target_reaches_a_server(connect: Any, grpc_server: Any) -> None:
    port = grpc_server.address.rpartition(":")[2]
    assert connect(f"dns:///localhost:{port}").serving_status() == "SERVING"


def test_parse_target() -> None:
    one = parse_target("127.0.0.1:8001")
    assert (one.uri, one.spread) == ("127.0.0.1:8001", False)
    listed = parse_target(["localhost:8001", "127.0.0.1:8002"])
    assert listed.uri == "ipv4:127.0.0.1:8001,127.0.0.1:8002" and listed.spread
    assert listed.authority == "localhost:8001"
    assert parse_target("[::1]:1, [::1]:2").uri == "ipv6:[::1]:1,[::1]:2"
    assert parse_target("dns:///hrnet-replicas.default.svc:8001").spread
    assert not parse_target("unix:/tmp/hrnet.sock").spread
    for bad in ("", "a:1,", [], "noport,127.0.0.1:2", "127.0.0.1:1,[::1]:2"):
        with pytest.raises(ValueError):
            parse_target(bad)


def test_classify_command_takes_several_servers(
    start_server: Any, onnx_repo: Path, digit_images: list, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = start_server(onnx_repo), start_server(onnx_repo)
    paths = [str(d.path) for d in digit_images[:6]]
    assert main(["classify", *paths, "--server", f"{first.address},{second.address}", "--json"]) == 0
    assert capsys.readouterr().out.count('"predictions"') == 6


def test_several_replicas_over_tls(connect: Any, start_server: Any, onnx_repo: Path, certs: Any) -> None:
    # The certificate names 127.0.0.1 and localhost: host names are resolved to IPs, and the
    # name checked is still the first address given.
    tls = {"tls_cert": str(certs.server_cert), "tls_key": str(certs.server_key)}
    first, second = start_server(onnx_repo, **tls), start_server(onnx_repo, **tls)
    ports = [s.address.rpartition(":")[2] for s in (first, second)]
    client = connect([f"localhost:{p}" for p in ports], tls=TlsConfig(ca=certs.ca))
    assert {client.serving_status() for _ in range(4)} == {"SERVING"}
    for _ in range(6):
        client.model_metadata()
    assert first.metric(IMAGES) == second.metric(IMAGES) == 0  # (metadata computes nothing)
