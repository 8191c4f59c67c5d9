"""The Open Inference Protocol over HTTP/REST on a real server: the same answers as gRPC, JSON and
binary tensors, HTTP statuses for every error, the metrics port's probes, and the REST port's
security. tritonclient.http itself is in test_tritonclient.py."""

from __future__ import annotations

import base64
import json
import socket
import struct
import threading
import urllib.error
import urllib.request

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from core.metadata import ModelMetadata
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from serving import errors
from serving.api.http import json_errors
from serving.api.rest_codec import to_json
from serving.engine.preprocess import PreprocessSpec, preprocess_image
from serving.errors import ListenError

HEADER = "Inference-Header-Content-Length"


def call(url: str, body: bytes | None = None, headers: dict | None = None, method: str | None = None):
    """(status, headers, body) of one HTTP request; error statuses are answers, not exceptions."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.headers, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def infer_body(inputs: list[dict], binary: bytes = b"", **fields) -> tuple[bytes, dict]:
    """A request body: JSON, then the binary tensor data (with the header saying where JSON ends)."""
    header = json.dumps({"inputs": inputs, **fields}).encode()
    return header + binary, ({HEADER: str(len(header))} if binary else {})


def binary_outputs(headers, body: bytes) -> tuple[dict, bytes]:
    length = int(headers[HEADER])
    return json.loads(body[:length]), body[length:]


def length_prefixed(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


@pytest.fixture(scope="module")
def base(grpc_server) -> str:
    return f"http://{grpc_server.http_address}"


@pytest.fixture(scope="module")
def kserve(grpc_server):
    with grpc.insecure_channel(grpc_server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def reference(model_repo, digit_images):
    """The preprocessed batch of three digits and onnxruntime's logits for it."""
    session = ort.InferenceSession(str(model_repo.onnx), providers=["CPUExecutionProvider"])
    spec = PreprocessSpec.from_metadata(
        ModelMetadata.from_json(session.get_modelmeta().custom_metadata_map["hrnet_metadata"])
    )
    pngs = [d.png for d in digit_images[:3]]
    batch = np.stack([preprocess_image(p, spec) for p in pngs])
    return pngs, batch, session.run(None, {"image": batch})[0]


def test_health_metadata_config_and_statistics_are_grpc_answers_as_json(base, kserve) -> None:
    assert call(f"{base}/v2/health/live")[0] == 200
    assert call(f"{base}/v2/health/ready")[0] == 200
    assert call(f"{base}/v2/models/hrnet/ready")[0] == 200
    assert call(f"{base}/v2/models/hrnet/versions/1/ready")[0] == 200
    server = json.loads(call(f"{base}/v2")[2])
    assert server["name"] == "hrnet" and {"binary_tensor_data", "classification"} <= set(server["extensions"])

    status, _, body = call(f"{base}/v2/models/hrnet")
    metadata = json.loads(body)
    assert status == 200
    assert metadata == to_json(kserve.ModelMetadata(pb.ModelMetadataRequest(name="hrnet")))
    image = metadata["inputs"][0]
    assert (image["name"], image["datatype"], image["shape"]) == ("image", "FP32", [-1, 3, 32, 32])
    # The truth about what the input takes, over gRPC too: FP16 and encoded images as well.
    assert image["parameters"]["datatypes"] == "FP32,FP16,UINT8,BYTES"
    assert image["parameters"]["bytes_shape"] == "[-1]"
    assert "PNG" in image["parameters"]["bytes_content"]
    assert metadata["outputs"][0]["shape"] == [-1, 10]
    assert json.loads(call(f"{base}/v2/models/hrnet/versions/1")[2]) == metadata

    config = json.loads(call(f"{base}/v2/models/hrnet/config")[2])
    assert config["max_batch_size"] == 16 and config["input"][0]["dims"] == [3, 32, 32]
    assert config["parameters"]["input_datatypes"] == {"string_value": "FP32,FP16,UINT8,BYTES"}
    assert config["input"][0]["data_type"] == "TYPE_FP32"

    stats = json.loads(call(f"{base}/v2/models/hrnet/stats")[2])["model_stats"]
    assert [(s["name"], s["version"]) for s in stats] == [("hrnet", "1")]
    assert isinstance(stats[0]["inference_count"], int)
    every = json.loads(call(f"{base}/v2/models/stats")[2])["model_stats"]
    assert {s["name"] for s in every} == {"hrnet", "hrnet_ms", "plain"}


def test_json_and_binary_tensors_agree_with_onnxruntime(base, reference) -> None:
    pngs, batch, expected = reference
    url = f"{base}/v2/models/hrnet/infer"
    shape = list(batch.shape)

    # JSON data, nested as the array is; JSON logits back, the id echoed.
    body, _ = infer_body(
        [{"name": "image", "datatype": "FP32", "shape": shape, "data": batch.tolist()}], id="j1"
    )
    status, headers, answer = call(url, body)
    reply = json.loads(answer)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert (reply["id"], reply["model_name"], reply["model_version"]) == ("j1", "hrnet", "1")
    out = reply["outputs"][0]
    assert (out["name"], out["datatype"], out["shape"]) == ("logits", "FP32", [3, 10])
    np.testing.assert_allclose(np.array(out["data"]).reshape(3, 10), expected, rtol=1e-4, atol=1e-5)

    # Binary in (FP32 and FP16), binary out.
    for datatype, dtype in (("FP32", "<f4"), ("FP16", "<f2")):
        data = batch.astype(dtype).tobytes()
        tensor = {
            "name": "image",
            "datatype": datatype,
            "shape": shape,
            "parameters": {"binary_data_size": len(data)},
        }
        body, headers = infer_body([tensor], data, parameters={"binary_data_output": True})
        status, reply_headers, answer = call(url, body, headers)
        doc, raw = binary_outputs(reply_headers, answer)
        assert status == 200 and doc["outputs"][0]["parameters"] == {"binary_data_size": 120}
        tolerance = 1e-4 if datatype == "FP32" else 5e-2
        np.testing.assert_allclose(
            np.frombuffer(raw, "<f4").reshape(3, 10), expected, rtol=tolerance, atol=tolerance
        )

    # Encoded images: binary BYTES, and base64 in JSON (the curl way), with class_count.
    data = length_prefixed(pngs)
    tensor = {
        "name": "image",
        "datatype": "BYTES",
        "shape": [3],
        "parameters": {"binary_data_size": len(data)},
    }
    body, headers = infer_body(
        [tensor], data, outputs=[{"name": "logits", "parameters": {"binary_data": True}}]
    )
    status, reply_headers, answer = call(url, body, headers)
    np.testing.assert_allclose(
        np.frombuffer(binary_outputs(reply_headers, answer)[1], "<f4").reshape(3, 10),
        expected,
        rtol=1e-4,
        atol=1e-5,
    )
    encoded = [base64.b64encode(p).decode() for p in pngs]
    tensor = {"name": "image", "datatype": "BYTES", "shape": [3], "data": encoded}
    tensor["parameters"] = {"content_type": "base64"}
    body, _ = infer_body([tensor], outputs=[{"name": "logits", "parameters": {"classification": 2}}])
    ranked = json.loads(call(url, body)[2])["outputs"][0]
    assert (ranked["datatype"], ranked["shape"]) == ("BYTES", [3, 2])
    for row in range(3):
        best = np.argsort(-expected[row])[:2]
        items = ranked["data"][2 * row : 2 * row + 2]
        assert [int(item.split(":")[1]) for item in items] == best.tolist()
        assert items[0].split(":")[2] == f"digit-{best[0]}"


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "quoted"),
    [
        ("/v2/models/missing", None, {}, 404, "model 'missing' is not served here; available: hrnet"),
        ("/v2/models/hrnet/versions/7/infer", b"{}", {}, 404, "version '7'"),
        ("/v2/models/hrnet/infer", b"{not json", {}, 400, "not valid JSON"),
        ("/v2/models/hrnet/infer", b"[1]", {}, 400, "must be a JSON object"),
        ("/v2/models/hrnet/infer", b'{"inputs": []}', {HEADER: "99"}, 400, "must be within 0..14"),
        ("/v2/models/hrnet/infer", b'{"inputs": []}xyz', {HEADER: "14"}, 400, "3 bytes after the JSON"),
        (
            "/v2/models/hrnet/infer",
            b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 32], "data": [1, 2]}]}',
            {},
            400,
            "shape [1, 3, 32] holds 96 values, got 2",
        ),
        (
            "/v2/models/hrnet/infer",
            infer_body([{"name": "image", "datatype": "FP32", "shape": [1, 3, 4, 4], "data": [0.0] * 48}])[0],
            {},
            400,
            "expected shape [-1, 3, 32, 32] (N >= 1), got [1, 3, 4, 4]",
        ),
        (
            "/v2/models/hrnet/infer",
            b'{"inputs": [{"name": "pixels", "datatype": "INT8", "shape": [1], "data": [1]}]}',
            {},
            400,
            "unknown input 'pixels'; the model's input is 'image'",
        ),
        (
            "/v2/models/hrnet/infer",
            b'{"inputs": [{"name": "image", "datatype": "INT8", "shape": [1], "data": [1]}]}',
            {},
            400,
            "datatype 'INT8' not supported; use FP32, FP16, UINT8 or BYTES",
        ),
        (
            "/v2/models/hrnet/infer",
            b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%"], '
            b'"parameters": {"content_type": "base64"}}]}',
            {},
            400,
            "element 0 is not base64",
        ),
        (
            "/v2/models/hrnet/infer",
            b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["not an image"]}]}',
            {},
            400,
            "image 0:",
        ),
        (
            "/v2/models/hrnet/infer",
            b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1]}], '
            b'"parameters": {"timeout": [1]}}',
            {},
            400,
            "parameter 'timeout' must be a boolean, a 64-bit integer, a number or a string",
        ),
        ("/v2/nowhere", None, {}, 404, "Not Found: GET /v2/nowhere"),
        ("/v2/models/hrnet/infer", None, {}, 405, "Method Not Allowed: GET /v2/models/hrnet/infer"),
    ],
)
def test_bad_requests_get_http_statuses_and_the_grpc_messages(
    base, path, body, headers, status, quoted
) -> None:
    got, reply_headers, answer = call(base + path, body, headers)
    assert got == status, answer
    assert reply_headers["Content-Type"].startswith("application/json")
    error = json.loads(answer)["error"]
    assert quoted in error


def test_a_bad_request_gets_the_same_words_over_rest_and_grpc(base, kserve) -> None:
    bad = pb.ModelInferRequest(model_name="hrnet")
    bad.inputs.add(name="image", datatype="FP32", shape=[1, 3, 31, 31])
    bad.raw_input_contents.append(np.zeros(3 * 31 * 31, "<f4").tobytes())
    with pytest.raises(grpc.RpcError) as caught:
        kserve.ModelInfer(bad)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    body, _ = infer_body(
        [{"name": "image", "datatype": "FP32", "shape": [1, 3, 31, 31], "data": [0.0] * 2883}]
    )
    status, _, answer = call(f"{base}/v2/models/hrnet/infer", body)
    assert status == 400 and json.loads(answer)["error"] == caught.value.details()


CODES = [
    (errors.InvalidArgument("bad"), 400),
    (errors.ModelNotFound("m"), 404),
    (errors.QueueFull(250, 10, 256), 429),
    (errors.DeadlineExceeded(0.25), 504),
    (errors.Unavailable("draining"), 503),
    (errors.InferenceFailed("boom"), 500),
    (errors.Unimplemented("no"), 501),
    (errors.Unauthenticated("who"), 401),
    (errors.FailedPrecondition("off"), 400),
    (ZeroDivisionError("oops"), 500),
]


@pytest.mark.parametrize(("error", "status"), CODES, ids=[type(e).__name__ for e, _ in CODES])
async def test_every_error_maps_to_its_http_status(error: Exception, status: int) -> None:
    async def fail(request: web.Request) -> web.Response:
        raise error

    app = web.Application(middlewares=[json_errors])
    app.router.add_get("/", fail)
    async with TestClient(TestServer(app)) as client:
        reply = await client.get("/")
        assert reply.status == status
        message = (await reply.json())["error"]
    expected = (
        f"internal error: ZeroDivisionError: {error}"
        if status == 500 and not hasattr(error, "code")
        else str(error)
    )
    assert message == expected


def test_draining_turns_readiness_off_everywhere(start_server, plain_repo) -> None:
    running = start_server(plain_repo)
    base, probes = f"http://{running.http_address}", f"http://127.0.0.1:{running.metrics_port}"
    assert [call(f"{probes}/{p}")[0] for p in ("healthz", "readyz")] == [200, 200]
    assert call(f"{base}/v2/health/ready")[0] == 200
    running.call(running.server.plane.drain(0.0))
    assert call(f"{probes}/readyz")[0] == 503 and call(f"{probes}/healthz")[0] == 200
    assert call(f"{base}/v2/health/ready")[0] == 400 and call(f"{base}/v2/health/live")[0] == 200
    assert call(f"{base}/v2/models/plain/ready")[0] == 503  # UNAVAILABLE: come back later
    body, _ = infer_body(
        [{"name": "input", "datatype": "FP32", "shape": [1, 3, 16, 16], "data": [0.0] * 768}]
    )
    status, _, answer = call(f"{base}/v2/models/plain/infer", body)
    assert status == 503 and "shutting down" in json.loads(answer)["error"]


def test_metrics_port_serves_metrics_probes_and_404(grpc_server) -> None:
    probes = f"http://127.0.0.1:{grpc_server.metrics_port}"
    status, headers, body = call(f"{probes}/metrics")
    assert status == 200 and "hrnet_requests_total" in body.decode()
    assert headers["Content-Type"].startswith("text/plain")
    assert call(f"{probes}/healthz")[2] == b"ok\n" and call(f"{probes}/readyz")[2] == b"ready\n"
    status, _, body = call(f"{probes}/")
    assert status == 404 and b"hrnet_requests_total" not in body
    assert call(f"{probes}/metrics/x")[0] == 404


def test_repository_index_and_model_control(base) -> None:
    index = json.loads(call(f"{base}/v2/repository/index", b"")[2])
    assert {(m["name"], m["version"], m["state"]) for m in index} == {
        ("hrnet", "1", "READY"),
        ("hrnet_ms", "1", "READY"),
        ("plain", "1", "READY"),
    }
    assert json.loads(call(f"{base}/v2/repository/index", b'{"ready": true}')[2]) == index
    status, _, body = call(f"{base}/v2/repository/models/hrnet/unload", b"")
    assert status == 400 and "--model-control explicit" in json.loads(body)["error"]


def test_rest_needs_the_token_except_for_health(start_server, plain_repo) -> None:
    running = start_server(plain_repo, auth_token="s3cret")
    base = f"http://{running.http_address}"
    assert call(f"{base}/v2/health/ready")[0] == 200 and call(f"{base}/v2/health/live")[0] == 200
    status, _, body = call(f"{base}/v2/models/plain")
    assert status == 401 and "Authorization: Bearer <token>" in json.loads(body)["error"]
    assert call(f"{base}/v2/models/plain", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert call(f"{base}/v2/models/plain", headers={"Authorization": "Bearer s3cret"})[0] == 200


@pytest.mark.parametrize("port", ["http_port", "metrics_port"])
def test_a_busy_port_is_a_clean_start_error(start_server, plain_repo, port) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        before = set(threading.enumerate())
        with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{busy} for "):
            start_server(plain_repo, **{port: busy})
    # Nothing left running: no thread that was not there before (comparing counts failed when a
    # thread of an earlier test ended meanwhile). grpc.aio's poller, started once per process by
    # the first server and kept by design, is not ours.
    left = {t for t in threading.enumerate() if "_poll_wrapper" not in t.name}
    assert left <= before, left - before
