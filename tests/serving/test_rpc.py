"""The call guard and the status mapping, on a real server: malformed messages, streams, long names."""

from __future__ import annotations

import logging
import time

import grpc
import numpy as np
import pytest

from protos import classifier_pb2
from protos import grpc_service_pb2 as pb

GARBAGE = b"\xff\xff\xff\xff\x0f"  # a varint that never ends: no protobuf parses it


def raw_unary(channel: grpc.Channel, path: str) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(path, request_serializer=bytes, response_deserializer=bytes)


def raw_stream(channel: grpc.Channel, path: str) -> grpc.StreamStreamMultiCallable:
    return channel.stream_stream(path, request_serializer=bytes, response_deserializer=bytes)


@pytest.fixture(scope="module")
def channel(grpc_server):
    with grpc.insecure_channel(grpc_server.address) as ch:
        yield ch


@pytest.mark.parametrize(
    "path",
    [
        "/inference.GRPCInferenceService/ModelInfer",
        "/inference.GRPCInferenceService/ModelMetadata",
        "/hrnet.v1.Classifier/Classify",
        "/grpc.health.v1.Health/Check",
    ],
)
def test_malformed_message_is_invalid_argument_in_one_log_line(channel, path, caplog) -> None:
    with caplog.at_level(logging.WARNING), pytest.raises(grpc.RpcError) as info:
        raw_unary(channel, path)(GARBAGE, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == (
        f"malformed request: 5 bytes that do not parse as the request message of {path}"
    )
    assert "DecodeError" not in info.value.details()
    records = [r for r in caplog.records if r.getMessage() == "malformed request"]
    assert len(records) == 1 and records[0].method == path
    assert not any(r.exc_info for r in caplog.records)


def _good_infer() -> bytes:
    request = pb.ModelInferRequest(model_name="hrnet", id="good")
    request.inputs.add(name="image", datatype="FP32", shape=[1, 3, 32, 32])
    request.raw_input_contents.append(np.zeros((1, 3, 32, 32), np.float32).tobytes())
    return request.SerializeToString()


def _good_classify() -> bytes:
    tensor = classifier_pb2.Tensor(datatype="FP32", shape=[1, 3, 32, 32])
    tensor.data = np.zeros((1, 3, 32, 32), np.float32).tobytes()
    return classifier_pb2.ClassifyRequest(model_name="hrnet", id="good", tensor=tensor).SerializeToString()


@pytest.mark.parametrize(
    ("path", "good", "parse"),
    [
        ("/inference.GRPCInferenceService/ModelStreamInfer", _good_infer, pb.ModelStreamInferResponse),
        ("/hrnet.v1.Classifier/ClassifyStream", _good_classify, classifier_pb2.ClassifyResponse),
    ],
    ids=["ModelStreamInfer", "ClassifyStream"],
)
def test_garbage_after_good_stream_requests_answers_them_then_ends_the_call(
    channel, path, good, parse
) -> None:
    """Was: the request reader died, its end marker never came, and the call hung forever."""
    started = time.monotonic()
    answers = []
    with pytest.raises(grpc.RpcError) as info:
        for raw in raw_stream(channel, path)(iter([good(), good(), GARBAGE, good()]), timeout=20):
            answers.append(parse.FromString(raw))
    # Milliseconds here; the hang this guards against ends only at the call's 20 s deadline (and
    # as DEADLINE_EXCEEDED, which the code check below also catches): 10 s sits between the two.
    assert time.monotonic() - started < 10
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request" in info.value.details()
    assert len(answers) == 2  # both accepted requests answered; nothing after the garbage is read
    assert all(_succeeded(answer) for answer in answers)


def _succeeded(answer: pb.ModelStreamInferResponse | classifier_pb2.ClassifyResponse) -> bool:
    if isinstance(answer, pb.ModelStreamInferResponse):
        return not answer.error_message
    return not answer.HasField("error")


def test_a_huge_model_name_is_quoted_briefly_and_not_found(channel) -> None:
    """Was: the echoed name made the status too large to deliver (RESOURCE_EXHAUSTED at the client)."""
    request = pb.ModelInferRequest(model_name="m" * 20000)
    with pytest.raises(grpc.RpcError) as info:
        raw_unary(channel, "/inference.GRPCInferenceService/ModelInfer")(
            request.SerializeToString(), timeout=10
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "(20002 characters)" in info.value.details()
    assert len(info.value.details()) < 300


def test_the_guard_counts_unary_calls_in_progress(grpc_server, channel) -> None:
    guard = grpc_server.server._guard
    raw_unary(channel, "/inference.GRPCInferenceService/ModelInfer")(_good_infer(), timeout=10)
    assert guard.active == 0
    assert grpc_server.call(guard.wait_idle(1.0))
