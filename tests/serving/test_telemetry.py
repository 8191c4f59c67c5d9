"""GPU and CPU telemetry on the metrics port of a real server on 127.0.0.1.

NVIDIA's NVML library cannot run on this machine (no GPU, no driver), so the GPU plumbing is
tested with a stand-in `pynvml` module that reports one device; the real library is checked by
`hrnet bench gpu` when a GPU machine is lent.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc


@pytest.fixture
def repo(model_repo, tmp_path: Path) -> Path:
    (tmp_path / "repo" / "hrnet" / "1").mkdir(parents=True)
    shutil.copy(model_repo.onnx, tmp_path / "repo" / "hrnet" / "1" / "model.onnx")
    return tmp_path / "repo"


def test_gpu_metrics_appear_when_nvml_reports_a_device(start_server, repo, stand_in_nvml) -> None:
    running = start_server(repo)
    assert running.metric("hrnet_gpu_utilization", gpu="0") == pytest.approx(0.37)
    assert running.metric("hrnet_gpu_memory_used_bytes", gpu="0") == 3 << 30
    assert running.metric("hrnet_gpu_memory_total_bytes", gpu="0") == 80 << 30
    assert running.metric("hrnet_gpu_power_watts", gpu="0") == pytest.approx(215.5)
    assert running.metric("hrnet_gpu_temperature_celsius", gpu="0") == 54


def test_no_nvml_no_gpu_metrics_and_one_info_line(start_server, repo, monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    with caplog.at_level("INFO", logger="serving.telemetry"):
        running = start_server(repo)
    assert "hrnet_gpu_" not in running.metrics_text()
    lines = [r.getMessage() for r in caplog.records if r.name == "serving.telemetry"]
    assert len(lines) == 1 and lines[0].startswith("no GPU metrics: NVML is not available here")


@pytest.mark.slow
def test_cpu_seconds_by_process_role_rise_with_load(start_server, repo) -> None:
    running = start_server(repo, workers=2)
    owner = running.metric("hrnet_process_cpu_seconds_total", role="owner")
    front_ends = [
        running.metric("hrnet_process_cpu_seconds_total", role="frontend", worker=str(i)) for i in (0, 1)
    ]
    assert owner > 0 and all(seconds > 0 for seconds in front_ends)  # each process was found
    request = pb.ModelInferRequest(model_name="hrnet")
    request.inputs.add(name="image", datatype="FP32", shape=[1, 3, 32, 32])
    request.raw_input_contents.append(np.zeros((1, 3, 32, 32), np.float32).tobytes())
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(300):
            stub.ModelInfer(request, timeout=30)
    after = running.metric("hrnet_process_cpu_seconds_total", role="owner")
    total_after = sum(
        running.metric("hrnet_process_cpu_seconds_total", role="frontend", worker=str(i)) for i in (0, 1)
    )
    # 300 requests cost each side well over a /proc tick (10 ms): about 0.1 s of owner CPU here.
    assert after > owner and total_after > sum(front_ends)
