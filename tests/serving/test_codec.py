"""Protocol conversion on its own: every malformed message is an InvalidArgument naming the problem."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos import classifier_pb2
from protos import grpc_service_pb2 as pb
from serving.api import codec
from serving.errors import InferenceFailed, InvalidArgument


def test_bytes_elements_round_trip_and_truncation() -> None:
    items = [b"", b"a", b"\x00" * 300]
    raw = codec.join_bytes_elements(items)
    assert codec.split_bytes_elements(raw, "x") == items
    with pytest.raises(InvalidArgument, match="truncated BYTES length prefix at byte 0 of 2"):
        codec.split_bytes_elements(b"\x01\x00", "x")
    with pytest.raises(InvalidArgument, match="element of 9 bytes at byte 4 overruns 6 bytes"):
        codec.split_bytes_elements(b"\x09\x00\x00\x00ab", "x")


def _request(datatype: str = "FP32", shape=(1, 3, 2, 2)) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="image", datatype=datatype, shape=list(shape))
    return request


def test_input_rules() -> None:
    both = _request()
    both.raw_input_contents.append(np.zeros(12, np.float32).tobytes())
    both.inputs[0].contents.fp32_contents.extend([0.0] * 12)
    with pytest.raises(InvalidArgument, match="both raw_input_contents and typed contents"):
        codec.decode_infer_request(both, "image")
    half_typed = _request("FP16")
    half_typed.inputs[0].contents.fp32_contents.extend([0.0] * 12)
    with pytest.raises(InvalidArgument, match="FP16 data travels only as raw_input_contents"):
        codec.decode_infer_request(half_typed, "image")
    negative = _request(shape=(1, -3, 2, 2))
    with pytest.raises(
        InvalidArgument, match=r"shape \[1, -3, 2, 2\] must have 1 to 8 dimensions, each >= 0"
    ):
        codec.decode_infer_request(negative, "image")
    deep = _request(shape=(1,) * 1000)  # quoted briefly, not as a thousand dimensions
    with pytest.raises(InvalidArgument, match=r"shape \[1, 1, 1, .*\.\.\. \(3000 characters\) must have"):
        codec.decode_infer_request(deep, "image")
    two = _request()
    two.inputs.add(name="other", datatype="FP32", shape=[1])
    with pytest.raises(InvalidArgument, match="expected exactly one input 'image', got 2"):
        codec.decode_infer_request(two, "image")
    images = _request("BYTES", shape=(2,))
    images.inputs[0].contents.bytes_contents.extend([b"a"])
    with pytest.raises(InvalidArgument, match="holds 2 BYTES elements, got 1"):
        codec.decode_infer_request(images, "image")


def test_parameters() -> None:
    request = _request()
    request.parameters["timeout"].string_param = "5s"
    with pytest.raises(InvalidArgument, match="'timeout' must be an integer, got string_param"):
        codec.decode_options(request, "logits")
    request = _request()
    request.parameters["timeout"].int64_param = 2500
    request.parameters["priority"].uint64_param = 2
    request.outputs.add(name="logits").parameters["classification"].int64_param = 3
    assert codec.decode_options(request, "logits") == codec.InferOptions(0.0025, 2, 3)
    request.outputs.add(name="probs")
    with pytest.raises(InvalidArgument, match="unknown output 'probs'"):
        codec.decode_options(request, "logits")
    misspelled = _request()
    misspelled.parameters["timout"].int64_param = 2500
    with pytest.raises(
        InvalidArgument, match=r"^unknown request parameter 'timout'; accepted: priority, timeout$"
    ):
        codec.decode_options(misspelled, "logits")


def test_top_k_is_best_first_and_capped() -> None:
    scores = np.array([[0.1, 0.7, 0.7, 0.2]], np.float32)
    order, values = codec.top_k(scores, 10)
    assert order.tolist() == [[1, 2, 3, 0]] and values[0, 0] == pytest.approx(0.7)


def test_nan_is_never_ranked() -> None:
    scores = np.array([[0.1, 0.7], [np.nan, np.nan]], np.float32)
    with pytest.raises(InferenceFailed, match=r"^item 1: the model's outputs are not finite"):
        codec.top_k(scores, 2)


def test_classify_request_needs_images_or_a_tensor_of_the_right_size() -> None:
    tensor = classifier_pb2.Tensor(datatype="FP32", shape=[1, 3, 2, 2], data=b"\x00" * 47)
    with pytest.raises(InvalidArgument, match=r"47 bytes but shape \[1, 3, 2, 2\] of FP32 needs 48"):
        codec.decode_classify_request(classifier_pb2.ClassifyRequest(tensor=tensor))
    with pytest.raises(InvalidArgument, match="either images or a tensor"):
        codec.decode_classify_request(classifier_pb2.ClassifyRequest(images=[b"x"], tensor=tensor))


@given(
    raws=st.lists(st.binary(max_size=300), max_size=3),
    name=st.text(max_size=20),
    shape=st.lists(st.integers(0, 2**40), max_size=5),
    priority=st.integers(0, 2**63 - 1),
)
@settings(max_examples=60, deadline=None)
def test_in_place_parse_is_protobufs_parse_with_the_buffers_left_in_place(
    raws, name, shape, priority
) -> None:
    request = pb.ModelInferRequest(model_name=name, id="r")
    request.inputs.add(name="image", datatype="FP32", shape=shape)
    request.parameters["priority"].uint64_param = priority
    request.outputs.add(name="logits")
    request.raw_input_contents.extend(raws)
    data = request.SerializeToString()
    parsed = codec.parse_infer_request(data)
    assert [bytes(raw) for raw in parsed.raw_input_contents] == raws
    assert all(raw.obj is data for raw in parsed.raw_input_contents)  # views, not copies
    del request.raw_input_contents[:]
    assert parsed.message == request
    assert (parsed.model_name, list(parsed.inputs[0].shape)) == (name, shape)


@pytest.mark.parametrize(
    "data",
    [b"\x3a\x05abc", b"\x3a\xff\xff", b"\x0f", b"\x08" + b"\xff" * 11, b"\x0a\x02\xff\xff"],
    ids=["raw overruns", "length truncated", "wire type 7", "varint too long", "bad utf-8 name"],
)
def test_in_place_parse_refuses_what_protobuf_refuses(data: bytes) -> None:
    with pytest.raises(Exception):  # noqa: B017 - protobuf's DecodeError or ours
        pb.ModelInferRequest.FromString(data)
    with pytest.raises(Exception):  # noqa: B017
        codec.parse_infer_request(data)
