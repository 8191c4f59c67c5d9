"""Run by test_tritonclient.py in a child process: tritonclient.grpc against our server.

tritonclient's generated modules define the same `inference.*` protobuf symbols as ours, and one
process's descriptor pool refuses duplicates, so the real Triton client runs here, alone, and
prints what it saw as JSON.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException


def main(address: str, batch_file: str, png_file: str) -> None:
    client = tc.InferenceServerClient(address)
    batch = np.load(batch_file)
    out: dict[str, object] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("hrnet"),
        "server_metadata": client.get_server_metadata(as_json=True),
        "model_metadata": client.get_model_metadata("hrnet", as_json=True),
        "model_config": client.get_model_config("hrnet", as_json=True),
    }
    image = tc.InferInput("image", list(batch.shape), "FP32")
    image.set_data_from_numpy(batch)
    result = client.infer("hrnet", [image], request_id="t1", priority=1, timeout=30_000_000)
    out["logits"] = result.as_numpy("logits").tolist()
    out["id"] = result.get_response().id
    ranked = client.infer("hrnet", [image], outputs=[tc.InferRequestedOutput("logits", class_count=2)])
    out["classification"] = [[item.decode() for item in row] for row in ranked.as_numpy("logits")]
    png = tc.InferInput("image", [1], "BYTES")
    with open(png_file, "rb") as handle:
        png.set_data_from_numpy(np.array([handle.read()], dtype=np.object_))
    out["bytes_logits"] = client.infer("hrnet", [png]).as_numpy("logits").tolist()
    streamed: list[tuple[str, object]] = []

    def on_result(result, error) -> None:
        streamed.append(
            ("error", str(error))
            if error
            else (result.get_response().id, result.as_numpy("logits")[0].tolist())
        )

    client.start_stream(callback=on_result)
    for i in range(3):
        single = tc.InferInput("image", [1, *batch.shape[1:]], "FP32")
        single.set_data_from_numpy(batch[i : i + 1])
        client.async_stream_infer("hrnet", [single], request_id=f"s{i}")
    client.stop_stream()
    out["stream"] = dict(streamed)
    out["statistics"] = client.get_inference_statistics("hrnet", as_json=True)
    try:
        client.get_model_metadata("missing")
    except InferenceServerException as exc:
        out["missing"] = exc.status()
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
