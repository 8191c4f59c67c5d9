"""Model control: fault isolation at load, the repository RPCs, polling, and version swaps under load."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import classifier_pb2, classifier_pb2_grpc
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from serving.engine.service import DataPlane
from serving.errors import ModelLoadError, Unavailable
from serving.server import Server
from tests.conftest import serving_config

PROBE = Path(__file__).with_name("triton_control_probe.py")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def put(repo: Path, name: str, version: str, source: Path | bytes) -> Path:
    """`REPO/name/version/model.onnx` from a file or from raw bytes."""
    target = repo / name / version / "model.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(source, bytes):
        target.write_bytes(source)
    else:
        shutil.copy(source, target)
    return target


def index(stub: pb_grpc.GRPCInferenceServiceStub, ready: bool = False) -> dict[tuple[str, str], tuple]:
    reply = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=ready), timeout=30)
    return {(m.name, m.version): (m.state, m.reason) for m in reply.models}


def infer_request(model: str = "hrnet", version: str = "", size: int = 32) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    name = "image" if model == "hrnet" else "input"
    request.inputs.add(name=name, datatype="FP32", shape=[1, 3, size, size])
    request.raw_input_contents.append(np.zeros((1, 3, size, size), np.float32).tobytes())
    return request


def until(check: Callable[[], bool], timeout_s: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def post(url: str, body: dict | None) -> tuple[int, Any]:
    """(status, JSON answer) of a REST call; a GET when `body` is None. Errors are answers."""
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=60) as reply:
            raw = reply.read()
            status = reply.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    return status, json.loads(raw) if raw.strip() else None


def health_of(channel: grpc.Channel, name: str) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name)).status


def test_model_ready_is_unavailable_while_the_server_starts_or_drains() -> None:
    """Not False (a client would give up on a model still loading) nor NOT_FOUND: come back."""
    plane = DataPlane()
    with pytest.raises(Unavailable):
        plane.model_ready("hrnet")
    plane.open()
    assert plane.model_ready("hrnet") is False  # accepting, and no such model: not served


def test_a_model_that_fails_to_load_leaves_the_others_serving(model_repo, start_server, tmp_path) -> None:
    repo = tmp_path / "repo"
    put(repo, "hrnet", "1", model_repo.onnx)
    broken = put(repo, "broken", "1", b"not a model")
    (repo / "empty").mkdir()
    server = start_server(repo)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(pb.ServerReadyRequest()).ready
        assert stub.ModelReady(pb.ModelReadyRequest(name="hrnet")).ready
        assert not stub.ModelReady(pb.ModelReadyRequest(name="broken")).ready
        with pytest.raises(grpc.RpcError) as typo:
            stub.ModelReady(pb.ModelReadyRequest(name="hrnett"))
        assert typo.value.code() == grpc.StatusCode.NOT_FOUND
        assert [health_of(channel, n) for n in ("", "hrnet", "broken")] == [SERVING, SERVING, NOT_SERVING]
        seen = index(stub)
        assert seen[("hrnet", "1")] == ("READY", "")
        state, reason = seen[("broken", "1")]
        assert state == "UNAVAILABLE" and "cannot load" in reason and str(broken) in reason
        assert seen[("empty", "")][0] == "UNAVAILABLE" and "no version folders" in seen[("empty", "")][1]
        assert index(stub, ready=True) == {("hrnet", "1"): ("READY", "")}
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(infer_request("broken"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND and "cannot load" in refused.value.details()
        assert stub.ModelInfer(infer_request(), timeout=30).model_version == "1"


async def test_exit_on_error_fails_the_start_with_every_reason(model_repo, tmp_path) -> None:
    repo = tmp_path / "repo"
    put(repo, "hrnet", "1", model_repo.onnx)
    broken = put(repo, "broken", "1", b"not a model")
    server = Server(serving_config(repo, exit_on_error=True))
    with pytest.raises(ModelLoadError, match="cannot load") as caught:
        await server.start()
    assert str(broken) in str(caught.value) and "exit_on_error" in str(caught.value)
    assert not server.plane.models


async def test_nothing_loadable_fails_the_start_in_mode_none(tmp_path) -> None:
    repo = tmp_path / "repo"
    put(repo, "broken", "1", b"not a model")
    with pytest.raises(ModelLoadError, match=r"nothing to serve in .*repo: .*cannot load"):
        await Server(serving_config(repo)).start()


def test_a_half_copied_newest_version_is_refused_clearly_at_start(model_repo, start_server, tmp_path) -> None:
    repo = tmp_path / "repo"
    put(repo, "plain", "1", model_repo.plain)
    put(repo, "hrnet", "1", model_repo.onnx)
    half = put(repo, "hrnet", "2", model_repo.onnx.read_bytes()[: model_repo.onnx.stat().st_size // 2])
    server = start_server(repo)
    with grpc.insecure_channel(server.address) as channel:
        seen = index(pb_grpc.GRPCInferenceServiceStub(channel))
    state, reason = seen[("hrnet", "2")]
    assert state == "UNAVAILABLE" and str(half) in reason and "cannot load" in reason
    assert seen[("hrnet", "1")] == ("UNAVAILABLE", "not in the version policy (latest 1)")
    assert seen[("plain", "1")] == ("READY", "")


def test_load_and_unload_need_model_control_explicit(grpc_server) -> None:
    with grpc.insecure_channel(grpc_server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for call, request in (
            (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="hrnet")),
            (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="hrnet")),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                call(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "--model-control explicit" in refused.value.details()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_tritonclient_loads_unloads_and_reads_the_index(model_repo, start_server, tmp_path, protocol) -> None:
    repo = tmp_path / "repo"
    put(repo, "hrnet", "1", model_repo.onnx)
    put(repo, "plain", "1", model_repo.plain)
    server = start_server(repo, model_control="explicit", load_models=("hrnet",))
    address = server.address if protocol == "grpc" else server.http_address
    proc = subprocess.run(
        [sys.executable, str(PROBE), address, protocol], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    start = {(m["name"], m.get("version", "")): m for m in seen["index_at_start"]}
    assert start[("hrnet", "1")]["state"] == "READY"
    assert start[("plain", "1")]["state"] == "UNAVAILABLE"
    assert "RepositoryModelLoad" in start[("plain", "1")]["reason"]
    assert not seen["plain_ready_before"] and seen["plain_ready_after_load"]
    assert not seen["hrnet_ready_after_unload"]
    after = {(m["name"], m.get("version", "")): m for m in seen["index_after"]}
    assert after[("hrnet", "1")]["state"] == "UNAVAILABLE" and after[("hrnet", "1")]["reason"] == "unloaded"
    assert after[("plain", "1")]["state"] == "READY"
    not_found, invalid = (
        ("StatusCode.NOT_FOUND", "StatusCode.INVALID_ARGUMENT") if protocol == "grpc" else ("404", "400")
    )
    assert seen["infer_unloaded"].startswith(not_found) and "unloaded" in seen["infer_unloaded"]
    assert seen["load_missing"].startswith(not_found) and "no folder" in seen["load_missing"]
    assert seen["load_with_config"].startswith(invalid) and "not supported" in seen["load_with_config"]
    assert seen["hrnet_ready_after_reload"]
    # The REST routes call the same operations.
    rest = f"http://{server.http_address}/v2"
    assert post(f"{rest}/repository/models/plain/unload", {})[0] == 200
    assert (
        post(f"{rest}/models/plain/ready", None)[0] == 400
        and post(f"{rest}/models/nope/ready", None)[0] == 404
    )
    status, body = post(f"{rest}/repository/models/plain/load", {"parameters": {"config": "{}"}})
    assert status == 400 and "not supported" in body["error"]
    assert post(f"{rest}/repository/models/plain/load", {})[0] == 200
    status, rows = post(f"{rest}/repository/index", {"ready": True})
    assert status == 200 and {(r["name"], r["version"]) for r in rows} == {("hrnet", "1"), ("plain", "1")}


def test_poll_waits_for_files_to_settle_keeps_the_old_version_and_follows_the_repository(
    model_repo, start_server, tmp_path
) -> None:
    repo = tmp_path / "repo"
    put(repo, "hrnet", "1", model_repo.onnx)
    server = start_server(repo, model_control="poll", repository_poll_s=0.1)
    full = model_repo.onnx.read_bytes()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def served() -> str:
            return stub.ModelInfer(infer_request(), timeout=30).model_version

        # A copy in progress: the file grows between polls, so version 2 is not touched.
        target = put(repo, "hrnet", "2", b"")
        with open(target, "ab") as copying:
            for start in range(0, len(full) // 2, len(full) // 20):
                copying.write(full[start : start + len(full) // 20])
                copying.flush()
                time.sleep(0.06)
                state, reason = index(stub)[("hrnet", "2")]
                assert (state, reason.split(" (")[0]) in {
                    ("UNAVAILABLE", "waiting for its files to stop changing"),
                    ("UNAVAILABLE", "not loaded yet"),
                }, reason
        # The copy stalls half way: once settled it is tried, fails, and version 1 keeps serving.
        until(lambda: "cannot load" in index(stub)[("hrnet", "2")][1], what="the half file was tried")
        assert index(stub)[("hrnet", "1")][0] == "READY" and served() == "1"
        # The copy completes: version 2 loads, then version 1 is unloaded (latest 1).
        target.write_bytes(full)
        until(lambda: index(stub)[("hrnet", "1")][0] == "UNAVAILABLE", what="version 1 unloaded")
        assert index(stub)[("hrnet", "2")] == ("READY", "") and served() == "2"
        # A new model folder is picked up; a removed version and a removed model are unloaded.
        put(repo, "plain", "1", model_repo.plain)
        until(lambda: index(stub).get(("plain", "1"), ("",))[0] == "READY", what="plain loaded")
        shutil.rmtree(repo / "hrnet" / "2")
        shutil.rmtree(repo / "plain")
        until(lambda: ("plain", "1") not in index(stub), what="plain unloaded")
        until(lambda: ("hrnet", "2") not in index(stub), what="version 2 unloaded")
        assert served() == "1" and health_of(channel, "plain") == NOT_SERVING


def test_a_version_swap_under_load_fails_no_request(model_repo, digit_images, start_server, tmp_path) -> None:
    repo = tmp_path / "repo"
    put(repo, "hrnet", "1", model_repo.onnx)
    server = start_server(repo, model_control="explicit", load_models=("hrnet",))
    outcomes: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    stop = threading.Event()
    lock = threading.Lock()
    limit = 4000  # bounded, whatever the machine's speed
    png = digit_images[0].png

    def caller(kind: str) -> None:
        with grpc.insecure_channel(server.address) as channel:
            kserve = pb_grpc.GRPCInferenceServiceStub(channel)
            classifier = classifier_pb2_grpc.ClassifierStub(channel)
            while not stop.is_set() and sum(outcomes.values()) < limit:
                try:
                    if kind == "infer":
                        version = kserve.ModelInfer(infer_request(), timeout=30).model_version
                    elif kind == "rest":
                        status, answer = post(rest, rest_body)
                        if status != 200:
                            raise RuntimeError(f"REST {status}: {answer}")
                        version = answer["model_version"]
                    else:
                        request = classifier_pb2.ClassifyRequest(model_name="hrnet", images=[png])
                        version = classifier.Classify(request, timeout=30).model_version
                    code = "OK"
                except grpc.RpcError as exc:
                    code, version = exc.code().name, "-"
                except RuntimeError as exc:
                    code, version = str(exc)[:60], "-"
                with lock:
                    outcomes[code] += 1
                    versions[version] += 1

    rest = f"http://{server.http_address}/v2/models/hrnet/infer"
    rest_body = {
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}]
    }
    threads = [threading.Thread(target=caller, args=(k,)) for k in ("infer", "classify", "rest") * 2]
    for thread in threads:
        thread.start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            until(lambda: versions["1"] >= 30, what="traffic on version 1")
            put(repo, "hrnet", "2", model_repo.onnx)
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="hrnet"), timeout=60)
            swapped = sum(outcomes.values())
            until(lambda: sum(outcomes.values()) >= swapped + 30, what="traffic after the swap")
            seen = index(stub)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    print(f"swap under load: {dict(outcomes)} by version {dict(versions)}")
    assert set(outcomes) == {"OK"}, outcomes
    assert versions["1"] >= 30 and versions["2"] >= 30, versions
    assert seen[("hrnet", "2")] == ("READY", "")
    assert seen[("hrnet", "1")] == ("UNAVAILABLE", "unloaded: not in the version policy (latest 1)")


def test_every_served_instance_shares_the_cores(model_repo, start_server, tmp_path) -> None:
    repo = tmp_path / "repo"
    put(repo, "hrnet", "1", model_repo.onnx)
    put(repo, "plain", "1", model_repo.plain)
    (repo / "plain" / "config.yaml").write_text("instances: 2\n")
    server = start_server(repo)
    cores = os.cpu_count() or 1
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        threads = {
            name: int(
                stub.ModelConfig(pb.ModelConfigRequest(name=name))
                .config.parameters["threads_per_instance"]
                .string_value
            )
            for name in ("hrnet", "plain")
        }
    assert threads == {"hrnet": max(1, cores // 3), "plain": max(1, cores // 3)}
