"""Run by test_control.py in a child process: tritonclient's model control (over gRPC, or over
REST with tritonclient.http) against our server.

A child for the same reason as triton_probe.py: tritonclient's protobuf symbols clash with ours.
Prints what it saw as JSON.
"""

from __future__ import annotations

import importlib
import json
import sys

from tritonclient.utils import InferenceServerException


def status(call, *args, **kwargs) -> str:
    try:
        call(*args, **kwargs)
    except InferenceServerException as exc:
        return f"{exc.status()} {exc.message()}"
    return "OK"


def main(address: str, protocol: str) -> None:
    tc = importlib.import_module(f"tritonclient.{protocol}")
    client = tc.InferenceServerClient(address)

    def index() -> list[dict]:
        """The rows; tritonclient.grpc's JSON leaves out empty fields, as protobuf's does."""
        if protocol == "grpc":
            return client.get_model_repository_index(as_json=True)["models"]
        return client.get_model_repository_index()

    out: dict[str, object] = {"index_at_start": index()}
    out["plain_ready_before"] = client.is_model_ready("plain")
    client.load_model("plain")
    out["plain_ready_after_load"] = client.is_model_ready("plain")
    client.unload_model("hrnet")
    out["hrnet_ready_after_unload"] = client.is_model_ready("hrnet")
    out["index_after"] = index()
    out["infer_unloaded"] = status(client.get_model_metadata, "hrnet")
    out["load_missing"] = status(client.load_model, "missing")
    out["load_with_config"] = status(client.load_model, "plain", config="{}")
    client.load_model("hrnet")
    out["hrnet_ready_after_reload"] = client.is_model_ready("hrnet")
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
