"""Several front-end processes on one port (`workers` > 1) in front of one model process.

Real servers on 127.0.0.1, real worker processes, real onnxruntime: requests arriving through
different processes share one batch; every other RPC is answered by the model process; images
are decoded in the workers; drain, a dead worker and a dead owner are handled.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.overhead import children
from protos import classifier_pb2, classifier_pb2_grpc
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from serving.errors import ListenError
from serving.process import ServerProcess
from serving.server import check_port_free

SHAPE = (1, 3, 32, 32)
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # a channel of its own: its own TCP connection


@pytest.fixture
def repo(model_repo, tmp_path: Path) -> Path:
    """Only the ONNX HRNet (fast to load), as REPO/hrnet/1/model.onnx."""
    (tmp_path / "repo" / "hrnet" / "1").mkdir(parents=True)
    shutil.copy(model_repo.onnx, tmp_path / "repo" / "hrnet" / "1" / "model.onnx")
    return tmp_path / "repo"


def _infer_request(batch: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="hrnet")
    request.inputs.add(name="image", datatype="FP32", shape=batch.shape)
    request.raw_input_contents.append(batch.tobytes())
    return request


def _logits(response: pb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(-1, 10)


def _infer_alone(address: str, batch: np.ndarray) -> np.ndarray:
    with grpc.insecure_channel(address, options=OWN_CONNECTION) as channel:
        return _logits(
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_infer_request(batch), timeout=60)
        )


def test_requests_through_different_processes_share_one_batch(start_server, repo, model_repo) -> None:
    """16 callers on 16 connections, spread by the kernel over 2 workers: one batch of 16.

    Each worker hands over fewer than 16 requests, so a batch of 16 holds requests of both.
    """
    running = start_server(
        repo, workers=2, max_batch_size=16, max_queue_delay_us=10_000_000, adaptive_delay=False
    )
    rng = np.random.default_rng(0)
    batches = [rng.normal(0, 1, SHAPE).astype(np.float32) for _ in range(16)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda b: _infer_alone(running.address, b), batches))
    session = ort.InferenceSession(str(model_repo.onnx), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"image": np.concatenate(batches)})[0]
    np.testing.assert_allclose(np.concatenate(results), expected, rtol=1e-4, atol=1e-5)
    per_worker = [running.metric("hrnet_frontend_requests_total", worker=str(i)) for i in range(2)]
    assert sum(per_worker) == 16 and all(0 < n < 16 for n in per_worker), per_worker
    with grpc.insecure_channel(running.address) as channel:
        stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name="hrnet"), timeout=30
        )
    batch_stats = stats.model_stats[0].batch_stats
    assert [(b.batch_size, b.compute_infer.count) for b in batch_stats] == [(16, 1)]


def test_the_model_process_answers_everything_else(start_server, repo, grpc_server) -> None:
    """Health, readiness, metadata, config and reflection: forwarded, answered as by one process."""
    running = start_server(repo, workers=2)
    with (
        grpc.insecure_channel(running.address) as multi,
        grpc.insecure_channel(grpc_server.address) as single,
    ):
        stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in (multi, single)]
        for rpc, request in [
            ("ServerLive", pb.ServerLiveRequest()),
            ("ServerReady", pb.ServerReadyRequest()),
            ("ModelReady", pb.ModelReadyRequest(name="hrnet")),
            ("ServerMetadata", pb.ServerMetadataRequest()),
            ("ModelMetadata", pb.ModelMetadataRequest(name="hrnet")),
        ]:
            got, want = (getattr(stub, rpc)(request, timeout=30) for stub in stubs)
            assert got == want, rpc
        config = stubs[0].ModelConfig(pb.ModelConfigRequest(name="hrnet"), timeout=30).config
        assert config.name == "hrnet" and config.max_batch_size == 16
        with pytest.raises(grpc.RpcError) as missing:
            stubs[0].ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=30)
        assert (
            missing.value.code() == grpc.StatusCode.NOT_FOUND and "not served here" in missing.value.details()
        )
        health = health_pb2_grpc.HealthStub(multi).Check(
            health_pb2.HealthCheckRequest(service="hrnet"), timeout=30
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_images_are_decoded_in_the_workers_with_the_same_result(
    start_server, repo, grpc_server, digit_images
) -> None:
    running = start_server(repo, workers=2, frontend_buffer_mb=1)
    pngs = [d.png for d in digit_images[:6]]
    request = classifier_pb2.ClassifyRequest(model_name="hrnet", images=pngs, top_k=3)
    answers = []
    for address in (running.address, grpc_server.address):
        with grpc.insecure_channel(address) as channel:
            answers.append(classifier_pb2_grpc.ClassifierStub(channel).Classify(request, timeout=30))
    for got, want in zip(answers[0].results, answers[1].results, strict=True):
        assert [c.index for c in got.classes] == [c.index for c in want.classes]
        np.testing.assert_allclose([c.score for c in got.classes], [c.score for c in want.classes], rtol=1e-5)
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        bad = pb.ModelInferRequest(model_name="hrnet")
        bad.inputs.add(name="image", datatype="BYTES", shape=[2])
        bad.raw_input_contents.append(b"".join(struct.pack("<I", len(p)) + p for p in (pngs[0], b"junk")))
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(bad, timeout=30)
        assert (
            refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image 1:" in refused.value.details()
        )
        with pytest.raises(grpc.RpcError) as too_big:  # 100 x 3 x 32 x 32 FP32 > the 1 MiB buffer
            stub.ModelInfer(_infer_request(np.zeros((100, 3, 32, 32), np.float32)), timeout=30)
        assert too_big.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "frontend_buffer_mb" in too_big.value.details()
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="hrnet"), timeout=30).model_stats[0]
    # Failures in a worker are counted where the statistics live.
    assert stats.inference_stats.fail.count == 2 and stats.inference_stats.success.count == 1
    assert running.metric("hrnet_requests_total", code="INVALID_ARGUMENT") == 2


def test_draining_workers_refuse_new_requests_and_hand_over_the_accepted_ones(start_server, repo) -> None:
    running = start_server(
        repo, workers=2, max_batch_size=16, max_queue_delay_us=10_000_000, adaptive_delay=False
    )
    batch = np.zeros(SHAPE, np.float32)
    with ThreadPoolExecutor(4) as pool:
        accepted = [pool.submit(_infer_alone, running.address, batch) for _ in range(4)]
        deadline = time.monotonic() + 30
        while running.metric("hrnet_queue_depth_images") < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running.call(running.server.frontends.drain(5.0))  # what SIGTERM does first
        with pytest.raises(grpc.RpcError) as refused:
            _infer_alone(running.address, batch)
        assert (
            refused.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.value.details()
        )
        assert running.stop(10.0)  # the queued 4 are flushed and answered, then everything stops
        assert all(f.result().shape == (1, 10) for f in accepted)


def test_a_dead_worker_is_replaced(start_server, repo) -> None:
    running = start_server(repo, workers=2)
    before = running.server.frontends.pids()
    os.kill(before[0], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = running.server.frontends.pids()
        if before[0] not in pids and len(pids) == 2 and running.metric("hrnet_frontend_restarts_total") == 1:
            break
        time.sleep(0.2)
    assert before[0] not in running.server.frontends.pids() and before[1] in running.server.frontends.pids()
    assert running.metric("hrnet_frontend_restarts_total") == 1
    for _ in range(6):  # whichever worker each new connection reaches
        assert _infer_alone(running.address, np.zeros(SHAPE, np.float32)).shape == (1, 10)


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def test_sigterm_drains_and_a_dead_owner_takes_its_workers_along(repo) -> None:
    model = repo / "hrnet" / "1" / "model.onnx"
    flags = ["--model", str(model), "--workers", "2", "--metrics-port", "-1", "--log-format", "text"]
    with ServerProcess(flags) as server:
        workers = children(server.proc.pid)
        assert len(workers) == 2
        with ThreadPoolExecutor(8) as pool:
            calls = [
                pool.submit(_infer_alone, server.address, np.zeros((4, 3, 32, 32), np.float32))
                for _ in range(24)
            ]
            time.sleep(0.2)
            server.proc.send_signal(signal.SIGTERM)
            outcomes = []
            for call in calls:
                try:
                    outcomes.append(call.result().shape == (4, 10))
                except grpc.RpcError as exc:  # not accepted before the drain: retryable, never lost midway
                    outcomes.append(exc.code())
        assert server.proc.wait(60) == 0
    assert set(outcomes) <= {True, grpc.StatusCode.UNAVAILABLE} and True in outcomes, outcomes
    assert all(_gone(pid) for pid in workers)
    with ServerProcess(flags) as server:
        workers = children(server.proc.pid)
        server.proc.kill()
        server.proc.wait()
        deadline = time.monotonic() + 30
        while not all(_gone(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(_gone(pid) for pid in workers)


def _runs_uvloop(pid: int) -> bool:
    """Whether the process has uvloop's extension mapped: imported only to make its loop."""
    return "uvloop/loop." in Path(f"/proc/{pid}/maps").read_text()


def _policies(pid: int) -> set[int]:
    """The scheduling policies of the process's threads."""
    return {os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


def test_the_owner_and_its_workers_run_uvloop_unless_asked_for_asyncio(repo) -> None:
    """event_loop auto (the default) puts every process on uvloop; asyncio keeps the standard
    loop everywhere; both give the same logits. Every thread of a worker runs under SCHED_BATCH
    (core/scheduling.py), every thread of the owner as it was started."""
    model = repo / "hrnet" / "1" / "model.onnx"
    batch = np.random.default_rng(3).normal(0, 1, SHAPE).astype(np.float32)
    answers = []
    for loop, on_uvloop in (("auto", True), ("asyncio", False)):
        flags = ["--model", str(model), "--workers", "2", "--metrics-port", "-1", "--log-format", "text"]
        with ServerProcess([*flags, "--event-loop", loop]) as server:
            processes = [server.proc.pid, *children(server.proc.pid)]
            assert len(processes) == 3
            assert [_runs_uvloop(pid) for pid in processes] == [on_uvloop] * 3
            assert [_policies(pid) for pid in processes] == [{os.SCHED_OTHER}, *[{os.SCHED_BATCH}] * 2]
            answers.append(_infer_alone(server.address, batch))
            kind = "uvloop" if on_uvloop else "asyncio"
            assert f"event_loop={kind}" in server.log_path.read_text()
    np.testing.assert_array_equal(answers[0], answers[1])


def test_a_port_in_use_is_refused_before_any_worker_starts() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{port}"):
            check_port_free("127.0.0.1", port)
    assert check_port_free("127.0.0.1", 0) > 0


def test_the_token_is_checked_in_the_workers_and_travels_with_forwarded_calls(start_server, repo) -> None:
    running = start_server(repo, workers=2, auth_token="s3cret")
    token = (("authorization", "Bearer s3cret"),)
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for call, request in [
            (stub.ModelInfer, _infer_request(np.zeros(SHAPE, np.float32))),  # served by the worker
            (stub.ModelMetadata, pb.ModelMetadataRequest(name="hrnet")),  # forwarded to the owner
        ]:
            with pytest.raises(grpc.RpcError) as refused:
                call(request, timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert call(request, timeout=30, metadata=token).ByteSize() > 0
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no token


def test_repository_calls_reach_the_owner_and_every_worker_routes_by_the_new_catalog(
    start_server, repo
) -> None:
    """Load, a version swap and unload through the workers: forwarded, then published to each."""
    running = start_server(repo, workers=2, model_control="explicit")

    def infer_all() -> set[str]:
        """The version answering through 6 connections (spread over both workers), or the error."""
        seen = set()
        for _ in range(6):
            with grpc.insecure_channel(running.address, options=OWN_CONNECTION) as channel:
                try:
                    reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                        _infer_request(np.zeros(SHAPE, np.float32)), timeout=60
                    )
                    seen.add(reply.model_version)
                except grpc.RpcError as exc:
                    seen.add(exc.code().name)
        return seen

    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert infer_all() == {"NOT_FOUND"}  # explicit mode loads nothing unasked
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="hrnet"), timeout=60)
        assert infer_all() == {"1"}
        shutil.copytree(repo / "hrnet" / "1", repo / "hrnet" / "2")
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="hrnet"), timeout=60)
        assert infer_all() == {"2"}
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=30)
        assert [(m.name, m.version, m.state) for m in index.models] == [("hrnet", "2", "READY")]
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="hrnet"), timeout=60)
        assert infer_all() == {"NOT_FOUND"}


def test_records_carry_large_requests_deadlines_and_cancellations(start_server, repo, model_repo) -> None:
    """Through a worker: a request larger than max_batch_size is split by the owner and merged
    back; a request whose `timeout` passes while it waits in the queue is DEADLINE_EXCEEDED and
    not computed; a caller that gives up is withdrawn and counted CANCELLED."""
    running = start_server(
        repo, workers=2, max_batch_size=4, max_queue_delay_us=30_000_000, adaptive_delay=False
    )
    rng = np.random.default_rng(1)
    batch = rng.normal(0, 1, (8, 3, 32, 32)).astype(np.float32)
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        # 8 rows: two full batches of 4, merged back in order
        session = ort.InferenceSession(str(model_repo.onnx), providers=["CPUExecutionProvider"])
        big = _infer_request(batch)
        big.parameters["timeout"].int64_param = 60_000_000
        np.testing.assert_allclose(
            _logits(stub.ModelInfer(big, timeout=60)),
            session.run(None, {"image": batch})[0],
            rtol=1e-4,
            atol=1e-5,
        )
        lone = _infer_request(batch[:1])  # waits 30 s for company that never comes
        lone.parameters["timeout"].int64_param = 300_000  # 0.3 s in the queue
        with pytest.raises(grpc.RpcError) as expired:
            stub.ModelInfer(lone, timeout=20)
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "in the queue; not computed" in (expired.value.details() or "")
        leaving = stub.ModelInfer.future(_infer_request(batch[:1]))  # no deadline: it waits...
        time.sleep(0.5)
        assert leaving.cancel()  # ...until its caller gives up
    deadline = time.monotonic() + 10
    while running.metric("hrnet_requests_total", model="hrnet", code="CANCELLED") < 1:
        assert time.monotonic() < deadline, "the withdrawn request was never counted"
        time.sleep(0.05)
    assert running.metric("hrnet_requests_total", model="hrnet", code="DEADLINE_EXCEEDED") == 1
    assert running.metric("hrnet_requests_total", model="hrnet", code="OK") == 1
