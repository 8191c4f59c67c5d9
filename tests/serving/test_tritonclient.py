"""Triton's own Python client (tritonclient.grpc, unchanged) against our server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from core.metadata import ModelMetadata
from serving.preprocess import PreprocessSpec, preprocess_image

PROBE = Path(__file__).with_name("triton_probe.py")


def test_tritonclient_grpc_works_unchanged(grpc_server, model_repo, digit_images, tmp_path) -> None:
    session = ort.InferenceSession(str(model_repo.onnx), providers=["CPUExecutionProvider"])
    spec = PreprocessSpec.from_metadata(
        ModelMetadata.from_json(session.get_modelmeta().custom_metadata_map["hrnet_metadata"])
    )
    batch = np.stack([preprocess_image(d.png, spec) for d in digit_images[40:43]])
    np.save(tmp_path / "batch.npy", batch)
    proc = subprocess.run(
        [
            sys.executable,
            str(PROBE),
            grpc_server.address,
            str(tmp_path / "batch.npy"),
            str(digit_images[40].path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["live"] and seen["ready"] and seen["model_ready"]
    assert "classification" in seen["server_metadata"]["extensions"]
    assert seen["model_metadata"]["inputs"] == [
        {"name": "image", "datatype": "FP32", "shape": ["-1", "3", "32", "32"]}
    ]
    assert seen["model_config"]["config"]["max_batch_size"] == 16
    expected = session.run(None, {"image": batch})[0]
    np.testing.assert_allclose(np.array(seen["logits"]), expected, rtol=1e-4, atol=1e-5)
    assert seen["id"] == "t1"
    for row, ranked in enumerate(seen["classification"]):
        best = np.argsort(-expected[row])[:2]
        assert [int(item.split(":")[1]) for item in ranked] == best.tolist()
        assert ranked[0].split(":")[2] == f"digit-{best[0]}"
    np.testing.assert_allclose(np.array(seen["bytes_logits"])[0], expected[0], rtol=1e-4, atol=1e-5)
    assert sorted(seen["stream"]) == ["s0", "s1", "s2"]
    for i in range(3):
        np.testing.assert_allclose(np.array(seen["stream"][f"s{i}"]), expected[i], rtol=1e-4, atol=1e-5)
    assert int(seen["statistics"]["model_stats"][0]["inference_count"]) >= 10
    assert seen["missing"] == "StatusCode.NOT_FOUND"
