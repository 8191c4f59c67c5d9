"""Triton's own Python clients (tritonclient.grpc and tritonclient.http, unchanged) against our server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from core.metadata import ModelMetadata
from serving.engine.preprocess import PreprocessSpec, preprocess_image

PROBE = Path(__file__).with_name("triton_probe.py")
HTTP_PROBE = Path(__file__).with_name("triton_http_probe.py")


def _probe(script: Path, address: str, model_repo, digit_images, folder: Path) -> tuple[dict, np.ndarray]:
    """Run a probe in a child process on three digits; what it saw, and onnxruntime's logits."""
    session = ort.InferenceSession(str(model_repo.onnx), providers=["CPUExecutionProvider"])
    spec = PreprocessSpec.from_metadata(
        ModelMetadata.from_json(session.get_modelmeta().custom_metadata_map["hrnet_metadata"])
    )
    batch = np.stack([preprocess_image(d.png, spec) for d in digit_images[40:43]])
    np.save(folder / "batch.npy", batch)
    command = [sys.executable, str(script), address, str(folder / "batch.npy"), str(digit_images[40].path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), session.run(None, {"image": batch})[0]


def _check_ranked(ranked: list[list[str]], expected: np.ndarray) -> None:
    for row, items in enumerate(ranked):
        best = np.argsort(-expected[row])[:2]
        assert [int(item.split(":")[1]) for item in items] == best.tolist()
        assert items[0].split(":")[2] == f"digit-{best[0]}"


def test_tritonclient_grpc_works_unchanged(grpc_server, model_repo, digit_images, tmp_path) -> None:
    check_grpc_probe(*_probe(PROBE, grpc_server.address, model_repo, digit_images, tmp_path))


def test_tritonclient_through_several_front_end_processes(
    start_server, model_repo, digit_images, tmp_path
) -> None:
    """The same client session against 2 workers: registration, streams and statistics included."""
    repo = tmp_path / "repo"
    (repo / "hrnet" / "1").mkdir(parents=True)
    shutil.copy(model_repo.onnx, repo / "hrnet" / "1" / "model.onnx")
    running = start_server(repo, workers=2)
    check_grpc_probe(*_probe(PROBE, running.address, model_repo, digit_images, tmp_path))
    assert running.metric("hrnet_frontend_requests_total") >= 10


def check_grpc_probe(seen: dict, expected: np.ndarray) -> None:
    """What triton_probe.py saw, against onnxruntime's logits for the same three digits."""
    assert seen["live"] and seen["ready"] and seen["model_ready"]
    assert "classification" in seen["server_metadata"]["extensions"]
    assert seen["model_metadata"]["inputs"] == [
        {"name": "image", "datatype": "FP32", "shape": ["-1", "3", "32", "32"]}
    ]
    assert seen["model_config"]["config"]["max_batch_size"] == 16
    np.testing.assert_allclose(np.array(seen["logits"]), expected, rtol=1e-4, atol=1e-5)
    assert seen["id"] == "t1"
    _check_ranked(seen["classification"], expected)
    np.testing.assert_allclose(np.array(seen["bytes_logits"])[0], expected[0], rtol=1e-4, atol=1e-5)
    assert sorted(seen["stream"]) == ["s0", "s1", "s2"]
    for i in range(3):
        np.testing.assert_allclose(np.array(seen["stream"][f"s{i}"]), expected[i], rtol=1e-4, atol=1e-5)
    assert int(seen["statistics"]["model_stats"][0]["inference_count"]) >= 10
    assert seen["missing"] == "StatusCode.NOT_FOUND"
    assert "system_shared_memory" in seen["server_metadata"]["extensions"]
    check_shared_memory_round_trip(seen["shm"], expected)


def check_shared_memory_round_trip(seen: dict, expected: np.ndarray) -> None:
    """What triton_probe.shared_memory_round_trip saw: registration, logits read back, cleanup."""
    regions = seen["status"]["regions"]
    assert sorted(regions) == ["probe_in", "probe_out"]
    assert regions["probe_out"]["offset"] == str(3 * 3 * 32 * 32 * 4)  # after the FP32 input batch
    assert regions["probe_out"]["byte_size"] == str(expected.nbytes)
    assert len(seen["logits"]) == 4
    for logits in seen["logits"]:
        np.testing.assert_allclose(np.array(logits), expected, rtol=1e-4, atol=1e-5)
    assert seen["after_unregister"] == "StatusCode.NOT_FOUND"
    assert seen["left"] == {}


def test_tritonclient_http_works_unchanged(grpc_server, model_repo, digit_images, tmp_path) -> None:
    seen, expected = _probe(HTTP_PROBE, grpc_server.http_address, model_repo, digit_images, tmp_path)
    assert seen["live"] and seen["ready"] and seen["model_ready"]
    assert "binary_tensor_data" in seen["server_metadata"]["extensions"]
    image = seen["model_metadata"]["inputs"][0]
    assert (image["name"], image["datatype"], image["shape"]) == ("image", "FP32", [-1, 3, 32, 32])
    assert image["parameters"]["datatypes"] == "FP32,FP16,UINT8,BYTES"
    assert seen["model_config"]["max_batch_size"] == 16
    for key in ("logits", "json_logits", "aio_logits"):  # binary, JSON, and the asyncio client
        np.testing.assert_allclose(np.array(seen[key]), expected, rtol=1e-4, atol=1e-5)
    assert seen["id"] == "h1"
    _check_ranked(seen["classification"], expected)
    np.testing.assert_allclose(np.array(seen["bytes_logits"])[0], expected[0], rtol=1e-4, atol=1e-5)
    assert seen["statistics"]["model_stats"][0]["inference_count"] >= 10
    assert {"name": "hrnet", "version": "1", "state": "READY", "reason": ""} in seen["index"]
    assert seen["trace"]["trace_level"] == ["OFF"]
    assert seen["trace_updated"]["trace_rate"] == "10"
    assert seen["missing"][0] == "404" and "'missing' is not served here" in seen["missing"][1]
