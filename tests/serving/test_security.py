"""Who can reach what: the metrics endpoint stays on this machine unless configured, and one
connection cannot open more calls at once than `max_concurrent_streams`."""

from __future__ import annotations

import queue
import socket
import time
import urllib.request

import grpc
import pytest

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc


def _external_address() -> str | None:
    """This machine's address on its outgoing interface (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def _metrics_reachable(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as reply:
            return reply.status == 200
    except OSError:
        return False


@pytest.mark.slow  # 5-8 s: two servers loading the whole repository, MindSpore model included
def test_metrics_listen_on_loopback_unless_configured(model_repo, start_server) -> None:
    external = _external_address()
    if external is None:
        pytest.skip("this machine has no non-loopback address to try")
    server = start_server(model_repo.path, host="0.0.0.0")  # gRPC on every interface...
    assert _metrics_reachable("127.0.0.1", server.metrics_port)
    assert not _metrics_reachable(external, server.metrics_port)  # ...Prometheus on loopback only
    with grpc.insecure_channel(f"{external}:{server.server.port}") as channel:
        assert pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10).live
    opened = start_server(model_repo.path, host="127.0.0.1", metrics_host="0.0.0.0")
    assert _metrics_reachable(external, opened.metrics_port)


def test_one_connection_opens_at_most_max_concurrent_streams(model_repo, start_server) -> None:
    server = start_server(model_repo.path, max_concurrent_streams=1)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
        held: queue.Queue = queue.Queue()
        stream = stub.ModelStreamInfer(iter(held.get, None), timeout=30)  # open, sending nothing yet
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as info:  # the one stream slot is taken: this call waits
            stub.ServerLive(pb.ServerLiveRequest(), timeout=1)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        held.put(None)  # the client ends the stream, freeing the slot
        assert list(stream) == []
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
