"""Run by test_tritonclient.py in a child process: tritonclient.grpc against our server.

tritonclient's generated modules define the same `inference.*` protobuf symbols as ours, and one
process's descriptor pool refuses duplicates, so the real Triton client runs here, alone, and
prints what it saw as JSON.

tritonclient 2.41's shared-memory helpers find their C library with
`pkg_resources.resource_filename`, which setuptools >= 81 no longer ships (newer tritonclient
releases use multiprocessing.shared_memory but pin grpcio < 1.68 and protobuf < 6); that one
function is supplied here, and tritonclient itself runs unchanged.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import sys
import types

import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

if "pkg_resources" not in sys.modules:
    _shim = types.ModuleType("pkg_resources")
    _shim.resource_filename = lambda package, name: str(importlib.resources.files(package) / name)  # type: ignore
    sys.modules["pkg_resources"] = _shim
import tritonclient.utils.shared_memory as shm


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
    out["shm"] = shared_memory_round_trip(address, batch)
    print(json.dumps(out))


def shared_memory_round_trip(address: str, batch: np.ndarray) -> dict[str, object]:
    """Tensors by reference: inputs and outputs in system shared memory, as Triton's docs show.

    The registering client and the inferring clients are separate channels (on a server with
    several front-end processes, likely separate processes), so the registry must be global.
    """
    key = f"/hrnet_probe_{os.getpid()}"
    logits_bytes = batch.shape[0] * 10 * 4
    handle = shm.create_shared_memory_region("probe", key, batch.nbytes + logits_bytes)
    try:
        shm.set_shared_memory_region(handle, [batch])
        admin = tc.InferenceServerClient(address)
        admin.register_system_shared_memory("probe_in", key, batch.nbytes)
        admin.register_system_shared_memory("probe_out", key, logits_bytes, offset=batch.nbytes)
        status = admin.get_system_shared_memory_status(as_json=True)
        results = []
        for _ in range(4):
            client = tc.InferenceServerClient(address, channel_args=[("grpc.use_local_subchannel_pool", 1)])
            image = tc.InferInput("image", list(batch.shape), "FP32")
            image.set_shared_memory("probe_in", batch.nbytes)
            wanted = tc.InferRequestedOutput("logits")
            wanted.set_shared_memory("probe_out", logits_bytes)
            result = client.infer("hrnet", [image], outputs=[wanted])
            output = result.get_output("logits")
            logits = shm.get_contents_as_numpy(handle, np.float32, list(output.shape), offset=batch.nbytes)
            results.append(logits.tolist())
            client.close()
        admin.unregister_system_shared_memory("probe_out")
        try:
            admin.get_system_shared_memory_status("probe_out")
            after = "still registered"
        except InferenceServerException as exc:
            after = exc.status()
        admin.unregister_system_shared_memory()
        left = admin.get_system_shared_memory_status(as_json=True)
        admin.close()
    finally:
        shm.destroy_shared_memory_region(handle)
    return {"status": status, "logits": results, "after_unregister": after, "left": left}


if __name__ == "__main__":
    main(*sys.argv[1:])
