"""The `hrnet serve` process: clear start-up errors and a SIGTERM drain that loses nothing accepted."""

from __future__ import annotations

import collections
import json
import os
import queue
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients import Client, ClientError, RetryPolicy
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from serving.process import ServerProcess

HRNET = [sys.executable, "-m", "hrnet"]
TRITON_LOAD = Path(__file__).with_name("triton_load.py")


def _serve(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HRNET_LOG_FORMAT": "json"}
    return subprocess.Popen([*HRNET, "serve", *args], stderr=subprocess.PIPE, text=True, env=env)


def _wait_serving(proc: subprocess.Popen, lines: queue.Queue) -> str:
    def pump() -> None:
        for line in proc.stderr:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert proc.poll() is None, f"hrnet serve exited with {proc.returncode}"
            continue
        if line.startswith("{"):
            entry = json.loads(line)
            if entry["msg"] == "serving":
                return entry["address"]
    raise AssertionError("hrnet serve did not report `serving` in time")


def _request(pngs: list[bytes]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="hrnet")
    request.inputs.add(name="image", datatype="BYTES", shape=[len(pngs)])
    request.raw_input_contents.append(b"".join(struct.pack("<I", len(p)) + p for p in pngs))
    return request


@pytest.mark.slow  # ~5 s: an hrnet serve process draining 192 images one at a time
def test_sigterm_drains_accepted_work_then_exits_0(model_repo, digit_images, tmp_path) -> None:
    repo = tmp_path / "repo"
    (repo / "hrnet" / "1").mkdir(parents=True)
    shutil.copy(model_repo.onnx, repo / "hrnet" / "1" / "model.onnx")
    # Batches of one image on one thread: the accepted work below takes a while to drain.
    (repo / "hrnet" / "config.yaml").write_text(
        "threads_per_instance: 1\nbatching:\n  max_batch_size: 1\n  max_queue_size: 1024\n"
    )
    proc = _serve(
        "--repo", str(repo), "--port", "0", "--http-port", "-1", "--metrics-port", "-1", "--host", "127.0.0.1"
    )
    lines: queue.Queue = queue.Queue()
    try:
        address = _wait_serving(proc, lines)
        pngs = [d.png for d in digit_images]
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=60
            )
            statuses: list[int] = []
            watcher = threading.Thread(target=lambda: statuses.extend(r.status for r in _until_error(watch)))
            watcher.start()
            with ThreadPoolExecutor(24) as pool:
                calls = [
                    pool.submit(stub.ModelInfer, _request(pngs[i : i + 8]), timeout=60) for i in range(24)
                ]
                time.sleep(0.3)  # accepted: 192 images queued or running
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.1)
                with pytest.raises(grpc.RpcError) as refused:
                    stub.ModelInfer(_request(pngs[:1]), timeout=5)
                results = [c.result() for c in calls]
            watcher.join(30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert all(len(r.raw_output_contents[0]) == 8 * 10 * 4 for r in results)
        assert statuses[:1] == [health_pb2.HealthCheckResponse.SERVING]
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow  # 10-18 s: hrnet serve and a Triton client process under load
@pytest.mark.parametrize("workers", ["1", "2"], ids=["one process", "two front ends"])
def test_sigterm_under_load_ends_every_call_ok_or_unavailable(model_repo, tmp_path, workers) -> None:
    """16 tritonclient callers (a child process) and 16 of ours, retries off, through SIGTERM.

    Was: calls reaching gRPC while it shut down came back CANCELLED (15 of ~3,700), which Triton's
    client does not retry; now the server answers UNAVAILABLE until it exits, then the port is shut.
    """
    repo = tmp_path / "repo"
    (repo / "hrnet" / "1").mkdir(parents=True)
    shutil.copy(model_repo.onnx, repo / "hrnet" / "1" / "model.onnx")
    server = ServerProcess(["--repo", str(repo), "--metrics-port", "-1", "--workers", workers])
    server.start()
    triton = subprocess.Popen(
        [sys.executable, str(TRITON_LOAD), server.address, "16", "8"], stdout=subprocess.PIPE, text=True
    )
    ours: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def call_in_a_loop() -> None:
        with Client(server.address, retry=RetryPolicy.off(), timeout_s=20) as client:
            batch = np.zeros((1, 3, 32, 32), np.float32)
            while not stop.is_set():
                try:
                    client.infer(batch)
                    code = "OK"
                except ClientError as exc:
                    code = exc.code.name
                    time.sleep(0.01)
                with lock:
                    ours[code] += 1

    callers = [threading.Thread(target=call_in_a_loop) for _ in range(16)]
    try:
        for caller in callers:
            caller.start()
        assert triton.stdout is not None and triton.stdout.readline().strip() == "calling"
        time.sleep(1.0)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0
        time.sleep(1.0)  # and calls after the exit, to a closed port
        stop.set()
        for caller in callers:
            caller.join(30)
        theirs = json.loads(triton.communicate(timeout=60)[0])
    finally:
        stop.set()
        server.stop()
        if triton.poll() is None:
            triton.kill()
    for counts in (ours, theirs):
        assert set(counts) <= {"OK", "UNAVAILABLE"}, counts
        assert counts["OK"] > 0 and counts["UNAVAILABLE"] > 0, counts


def _until_error(stream):
    try:
        yield from stream
    except grpc.RpcError:
        return


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d / "missing.onnx", "does not exist"),
        (lambda d: (d / "broken.onnx").write_bytes(b"not a model") and d / "broken.onnx", "cannot load"),
    ],
    ids=["missing", "corrupt"],
)
def test_bad_model_is_a_clear_error_and_exit_2(tmp_path: Path, setup, message: str) -> None:
    path = setup(tmp_path)
    proc = subprocess.run(
        [*HRNET, "serve", "--model", str(path), "--port", "0", "--http-port", "-1", "--metrics-port", "-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert message in proc.stderr and str(path) in proc.stderr


def test_bad_setting_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "server.yaml"
    config.write_text("model_defaults:\n  batching:\n    max_batch_size: 0\n")
    proc = subprocess.run(
        [*HRNET, "serve", "--config", str(config), "--model", "x.onnx"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "max_batch_size must be >= 1, got 0" in proc.stderr


@pytest.mark.parametrize("which", ["--port", "--http-port", "--metrics-port"])
def test_a_busy_port_is_one_line_and_exit_2(model_repo, which: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = str(busy.getsockname()[1])
        ports = {"--port": "0", "--http-port": "0", "--metrics-port": "0", which: taken}
        proc = subprocess.run(
            [*HRNET, "serve", "--model", str(model_repo.onnx), "--host", "127.0.0.1"]
            + [arg for flag, port in ports.items() for arg in (flag, port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (error,) = [line for line in proc.stderr.splitlines() if "error" in line]
    assert error.startswith("hrnet serve: error: cannot") and taken in error
