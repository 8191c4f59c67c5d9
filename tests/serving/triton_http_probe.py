"""Run by test_tritonclient.py in a child process: tritonclient.http against our REST port.

A child process, like triton_probe.py: tritonclient.http brings gevent, which has no business in
the test process that runs our asyncio server. Prints what it saw as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
import tritonclient.http as tc
import tritonclient.http.aio as tc_aio
from tritonclient.utils import InferenceServerException


def main(address: str, batch_file: str, png_file: str) -> None:
    client = tc.InferenceServerClient(address)
    batch = np.load(batch_file)
    with open(png_file, "rb") as handle:
        png = handle.read()
    out: dict[str, object] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("hrnet"),
        "server_metadata": client.get_server_metadata(),
        "model_metadata": client.get_model_metadata("hrnet"),
        "model_config": client.get_model_config("hrnet"),
    }
    image = tc.InferInput("image", list(batch.shape), "FP32")
    image.set_data_from_numpy(batch)  # binary by default
    result = client.infer("hrnet", [image], request_id="h1", priority=1, timeout=30_000_000)
    out["logits"] = result.as_numpy("logits").tolist()
    out["id"] = result.get_response()["id"]
    as_json = tc.InferInput("image", list(batch.shape), "FP32")
    as_json.set_data_from_numpy(batch, binary_data=False)
    plain = client.infer("hrnet", [as_json], outputs=[tc.InferRequestedOutput("logits", binary_data=False)])
    out["json_logits"] = plain.as_numpy("logits").tolist()
    ranked = client.infer("hrnet", [image], outputs=[tc.InferRequestedOutput("logits", class_count=2)])
    out["classification"] = [[item.decode() for item in row] for row in ranked.as_numpy("logits")]
    encoded = tc.InferInput("image", [1], "BYTES")
    encoded.set_data_from_numpy(np.array([png], dtype=np.object_))
    out["bytes_logits"] = (
        client.infer(
            "hrnet", [encoded], request_compression_algorithm="gzip", response_compression_algorithm="gzip"
        )
        .as_numpy("logits")
        .tolist()
    )
    out["statistics"] = client.get_inference_statistics("hrnet")
    out["index"] = client.get_model_repository_index()
    out["trace"] = client.get_trace_settings()
    out["trace_updated"] = client.update_trace_settings("hrnet", {"trace_rate": "10"})
    try:
        client.get_model_metadata("missing")
    except InferenceServerException as exc:
        out["missing"] = [exc.status(), exc.message()]
    client.close()
    out["aio_logits"] = asyncio.run(infer_async(address, batch))
    print(json.dumps(out))


async def infer_async(address: str, batch: np.ndarray) -> list:
    client = tc_aio.InferenceServerClient(address)
    try:
        image = tc_aio.InferInput("image", list(batch.shape), "FP32")
        image.set_data_from_numpy(batch)
        return (await client.infer("hrnet", [image])).as_numpy("logits").tolist()
    finally:
        await client.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
