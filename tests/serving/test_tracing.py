"""OpenTelemetry tracing on real servers: the span tree of a request under the caller's trace
(gRPC metadata and HTTP headers), Triton's TraceSetting, export through OTLP to a collector
running in this process, and no trace of OpenTelemetry when tracing is off."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import urllib.request
from concurrent import futures

import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from protos import classifier_pb2, classifier_pb2_grpc
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc

PER_REQUEST = {"receive", "decode", "queue", "batch", "respond"}  # children of the request's span


def traceparent(trace_id: int, span_id: int, sampled: bool = True) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def tensor_request(request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="plain", id=request_id)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 3, 16, 16])
    request.raw_input_contents.append(np.zeros((1, 3, 16, 16), "<f4").tobytes())
    return request


def rest_infer(address: str, headers: dict | None = None, request_id: str = "") -> int:
    body = {"id": request_id, "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 16, 16]}]}
    body["inputs"][0]["data"] = [0.5] * 768
    request = urllib.request.Request(
        f"http://{address}/v2/models/plain/infer", data=json.dumps(body).encode(), headers=headers or {}
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        return reply.status


def trees(spans) -> dict[int, dict[str, list]]:
    """Spans by trace id, then by name."""
    out: dict[int, dict[str, list]] = {}
    for span in spans:
        out.setdefault(span.context.trace_id, {}).setdefault(span.name, []).append(span)
    return out


def test_every_request_is_a_span_tree_under_the_callers_trace(start_server, plain_repo, digit_images) -> None:
    exporter = InMemorySpanExporter()
    running = start_server(plain_repo, span_exporter=exporter)
    with grpc.insecure_channel(running.address) as channel:
        kserve = pb_grpc.GRPCInferenceServiceStub(channel)
        kserve.ModelInfer(tensor_request("g1"), metadata=[("traceparent", traceparent(1, 11))])
        classifier = classifier_pb2_grpc.ClassifierStub(channel)
        classify = classifier_pb2.ClassifyRequest(model_name="plain", images=[digit_images[0].png], id="c1")
        classifier.Classify(classify, metadata=[("traceparent", traceparent(2, 22))])
        kserve.ModelInfer(tensor_request())  # no traceparent: a trace of its own
    assert rest_infer(running.http_address, {"traceparent": traceparent(3, 33)}, "r1") == 200
    running.stop()  # flushes the exporter

    by_trace = trees(exporter.get_finished_spans())
    assert len(by_trace) == 4
    for trace_id, span_id, api, request_id in ((1, 11, "ModelInfer", "g1"), (2, 22, "Classify", "c1"),
                                                (3, 33, "REST infer", "r1")):  # fmt: skip
        tree = by_trace[trace_id]
        assert set(tree) == {"infer", "compute", *PER_REQUEST}, api
        (root,) = tree["infer"]
        assert root.parent.span_id == span_id and root.parent.is_remote  # the caller's span
        assert root.attributes["hrnet.model"] == "plain" and root.attributes["hrnet.api"] == api
        assert root.attributes["hrnet.request_id"] == request_id
        for name in PER_REQUEST:
            (child,) = tree[name]
            assert child.parent.span_id == root.context.span_id, name
            assert root.start_time <= child.start_time <= child.end_time <= root.end_time, name
        (batch,), (compute,), (queue,) = tree["batch"], tree["compute"], tree["queue"]
        assert compute.parent.span_id == batch.context.span_id
        assert batch.start_time <= compute.start_time <= compute.end_time <= batch.end_time
        assert queue.end_time == batch.start_time
        assert batch.attributes["hrnet.batch_size"] == 1
    (own,) = [tree for trace_id, tree in by_trace.items() if trace_id not in (1, 2, 3)]
    assert own["infer"][0].parent is None


def test_trace_settings_choose_what_is_traced(start_server, plain_repo) -> None:
    exporter = InMemorySpanExporter()
    running = start_server(plain_repo, span_exporter=exporter)
    with grpc.insecure_channel(running.address) as channel:
        kserve = pb_grpc.GRPCInferenceServiceStub(channel)

        def setting(model: str = "", **changes: list[str]) -> dict[str, list[str]]:
            request = pb.TraceSettingRequest(model_name=model)
            for key, values in changes.items():
                request.settings[key].value.extend(values)
            return {k: list(v.value) for k, v in kserve.TraceSetting(request).settings.items()}

        assert setting() == {
            "trace_level": ["TIMESTAMPS"],
            "trace_rate": ["1"],
            "trace_count": ["-1"],
            "log_frequency": ["0"],
            "trace_mode": ["opentelemetry"],
        }
        # Off for one model: nothing recorded, even with a sampled traceparent.
        assert setting("plain", trace_level=["OFF"])["trace_level"] == ["OFF"]
        assert setting()["trace_level"] == ["TIMESTAMPS"]  # the server-wide setting is untouched
        kserve.ModelInfer(tensor_request(), metadata=[("traceparent", traceparent(5, 55))])
        assert setting("plain", trace_level=[])["trace_level"] == ["TIMESTAMPS"]  # back to the server's
        # Rate 0 server-wide, over REST: only callers who sampled their trace are traced.
        base = f"http://{running.http_address}/v2/trace/setting"
        update = urllib.request.Request(base, data=json.dumps({"trace_rate": "0"}).encode())
        with urllib.request.urlopen(update, timeout=10) as reply:
            assert json.loads(reply.read())["trace_rate"] == "0"
        for _ in range(3):
            kserve.ModelInfer(tensor_request())
        kserve.ModelInfer(tensor_request(), metadata=[("traceparent", traceparent(6, 66, sampled=False))])
        kserve.ModelInfer(tensor_request(), metadata=[("traceparent", traceparent(7, 77))])
        assert setting(trace_rate=[])["trace_rate"] == ["1"]

        for changes, code, words in (
            ({"trace_level": ["TENSORS"]}, grpc.StatusCode.INVALID_ARGUMENT, "'TENSORS' is not supported"),
            ({"trace_file": ["/tmp/t"]}, grpc.StatusCode.INVALID_ARGUMENT, "'trace_file' cannot be changed"),
            ({"trace_rate": ["often"]}, grpc.StatusCode.INVALID_ARGUMENT, "trace_rate must be an integer"),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                setting(**changes)
            assert caught.value.code() == code and words in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            setting("missing")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    running.stop()
    assert set(trees(exporter.get_finished_spans())) == {7}


def test_tracing_needs_an_endpoint_to_be_switched_on(grpc_server) -> None:
    with grpc.insecure_channel(grpc_server.address) as channel:
        kserve = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.TraceSettingRequest()
        request.settings["trace_level"].value.append("TIMESTAMPS")
        with pytest.raises(grpc.RpcError) as caught:
            kserve.TraceSetting(request)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "trace_endpoint" in caught.value.details()


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector: keeps every export request."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_spans_reach_an_otlp_collector(start_server, plain_repo) -> None:
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        running = start_server(plain_repo, trace_endpoint=f"http://127.0.0.1:{port}")
        assert rest_infer(running.http_address, {"traceparent": traceparent(9, 99)}) == 200
        running.stop()  # the exporter sends what is pending before the server returns
    finally:
        server.stop(None)
    spans, services = [], set()
    for request in collector.requests:
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            services.add(attributes["service.name"])
            spans += [s for scope in resource_spans.scope_spans for s in scope.spans]
    assert services == {"hrnet"}
    by_name = {s.name: s for s in spans}
    assert set(by_name) == {"infer", "compute", *PER_REQUEST}
    assert {int.from_bytes(s.trace_id, "big") for s in spans} == {9}
    assert int.from_bytes(by_name["infer"].parent_span_id, "big") == 99
    for name in PER_REQUEST:
        assert by_name[name].parent_span_id == by_name["infer"].span_id
    assert by_name["compute"].parent_span_id == by_name["batch"].span_id


def test_tracing_off_never_imports_opentelemetry(plain_repo) -> None:
    script = textwrap.dedent(
        f"""
        import json, sys, urllib.request
        from serving import Server, ServerConfig

        ports = dict(host="127.0.0.1", port=0, http_port=0, metrics_port=-1)
        with Server(ServerConfig(repo={str(plain_repo)!r}, **ports)) as server:
            tensor = {{"name": "input", "datatype": "FP32", "shape": [1, 3, 16, 16], "data": [0] * 768}}
            body = {{"inputs": [tensor]}}
            url = f"http://{{server.http_address}}/v2/models/plain/infer"
            urllib.request.urlopen(urllib.request.Request(url, data=json.dumps(body).encode()), timeout=30)
        print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
