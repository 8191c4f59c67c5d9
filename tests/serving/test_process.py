"""`hrnet serve` as a child process (what the demo and the benchmarks start): ready, stopped, reasons."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.process import ServerExited, ServerProcess


def test_a_child_server_serves_then_stops_cleanly(model_repo) -> None:
    import grpc

    from protos import grpc_service_pb2 as pb
    from protos import grpc_service_pb2_grpc as pb_grpc

    server = ServerProcess(["--model", model_repo.onnx, "--metrics-port", "-1"])
    with server:
        with grpc.insecure_channel(server.address) as channel:
            ready = pb_grpc.GRPCInferenceServiceStub(channel).ModelReady(pb.ModelReadyRequest(name="hrnet"))
        assert ready.ready
    assert server.proc is not None and server.proc.returncode == 0  # SIGTERM drains and exits 0


def test_an_early_exit_reports_the_servers_own_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ServerExited) as caught:
        ServerProcess(["--model", bad, "--metrics-port", "-1"]).start(timeout_s=60)
    message = str(caught.value)
    assert "exited with 2" in message
    assert "hrnet serve: error:" in message and "bad.onnx" in message
