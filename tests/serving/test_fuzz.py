"""Property-based fuzzing (hypothesis) of the image decoder and of both services' request messages.

The properties: nothing crashes or hangs, the decoder returns the model's tensor or raises
ImageError, and every call ends OK or with a status the README documents for it. The number of
examples per test is HRNET_FUZZ_EXAMPLES (default 40, derandomized so `make test` is repeatable);
a longer run: HRNET_FUZZ_EXAMPLES=2000 pytest tests/serving/test_fuzz.py -s (it prints the counts).
"""

from __future__ import annotations

import collections
import io
import os
import time

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from core.metadata import ModelMetadata
from protos import classifier_pb2 as cpb
from protos import classifier_pb2_grpc
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from serving.engine.preprocess import ImageError, PreprocessSpec, preprocess_image

EXAMPLES = int(os.environ.get("HRNET_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize="HRNET_FUZZ_EXAMPLES" not in os.environ,
    deadline=None,  # a server call's time varies with the machine; a hang is caught by the timeouts
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SPEC = PreprocessSpec.from_metadata(ModelMetadata(arch="w18_small_v1", num_classes=10, input_size=32))
CALL_TIMEOUT_S = 30
# What the README promises each call may end with (DEADLINE_EXCEEDED from a `timeout` parameter;
# UNAVAILABLE needs a stopping server, which the fuzzer does not produce).
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
SEEN: collections.Counter[str] = collections.Counter()


def _seed_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (24, 20, 3), np.uint8)
    seeds = []
    for fmt, options in (("PNG", {}), ("JPEG", {"quality": 80}), ("GIF", {}), ("WEBP", {}), ("BMP", {})):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt, **options)
        seeds.append(buffer.getvalue())
    return seeds


SEEDS = _seed_images()


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid image with bytes flipped, cut short, or spliced: the decoder's hardest inputs."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.booleans()):
        data += draw(st.binary(max_size=64))
    return bytes(data)


image_bytes = st.one_of(st.binary(max_size=2048), mutated_images(), st.sampled_from(SEEDS))


@FUZZ
@given(data=image_bytes)
def test_the_decoder_returns_the_tensor_or_an_image_error(data: bytes) -> None:
    started = time.monotonic()
    try:
        tensor = preprocess_image(data, SPEC)
    except ImageError as exc:
        assert str(exc)
        SEEN["decoder ImageError"] += 1
    else:
        assert tensor.shape == (3, 32, 32) and tensor.dtype == np.float32 and np.isfinite(tensor).all()
        SEEN["decoder OK"] += 1
    # Decoding or refusing these few-kilobyte inputs takes milliseconds; 5 s (1000x) only fails for
    # a decoder that expands a small input into work (a bomb that slipped past the pixel limits).
    assert time.monotonic() - started < 5


# --- requests -------------------------------------------------------------------------------------

names = st.one_of(st.just("hrnet"), st.just(""), st.text(max_size=40))
dims = st.lists(st.one_of(st.integers(-2, 4), st.just(32), st.integers(0, 1 << 40)), max_size=6)
datatypes = st.sampled_from(["FP32", "FP16", "BYTES", "INT32", "", "FP64", "fp32"])
parameter_names = st.sampled_from(["timeout", "priority", "timout", "classification", "x"])


@st.composite
def parameter_values(draw: st.DrawFn) -> pb.InferParameter:
    kind = draw(st.sampled_from(["int64_param", "uint64_param", "string_param", "bool_param", "none"]))
    value = {
        "int64_param": st.integers(-(1 << 63), (1 << 63) - 1),
        "uint64_param": st.integers(0, (1 << 64) - 1),
        "string_param": st.text(max_size=10),
        "bool_param": st.booleans(),
        "none": st.none(),
    }[kind]
    drawn = draw(value)
    return pb.InferParameter() if drawn is None else pb.InferParameter(**{kind: drawn})


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        model_name=draw(names), model_version=draw(st.sampled_from(["", "1", "2"]))
    )
    request.id = draw(st.text(max_size=8))
    for _ in range(draw(st.integers(0, 2))):
        tensor = request.inputs.add(
            name=draw(st.sampled_from(["image", "pixels", ""])), datatype=draw(datatypes), shape=draw(dims)
        )
        if draw(st.booleans()):
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=64)))
        if draw(st.booleans()):
            tensor.contents.bytes_contents.extend(draw(st.lists(image_bytes, max_size=3)))
    if draw(st.booleans()):
        raw = draw(
            st.one_of(
                st.binary(max_size=256),
                st.just(np.zeros((1, 3, 32, 32), np.float32).tobytes()),
                st.lists(image_bytes, max_size=3).map(
                    lambda items: b"".join(len(i).to_bytes(4, "little") + i for i in items)
                ),
            )
        )
        request.raw_input_contents.append(raw)
    for name in draw(st.lists(parameter_names, max_size=3, unique=True)):
        request.parameters[name].CopyFrom(draw(parameter_values()))
    for _ in range(draw(st.integers(0, 2))):
        output = request.outputs.add(name=draw(st.sampled_from(["logits", "probs"])))
        if draw(st.booleans()):
            output.parameters["classification"].CopyFrom(draw(parameter_values()))
    return request


@st.composite
def nearly_valid_infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """A valid FP32 or FP16 request (any values, NaN included) with at most one thing changed."""
    n = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(["FP32", "FP16"]))
    values = draw(st.lists(st.floats(width=16), min_size=1, max_size=8))
    batch = np.resize(np.array(values, np.float32), (n, 3, 32, 32)).astype(
        "<f4" if dtype == "FP32" else "<f2"
    )
    request = pb.ModelInferRequest(model_name="hrnet")
    request.inputs.add(name="image", datatype=dtype, shape=[n, 3, 32, 32])
    raw = batch.tobytes()
    change = draw(st.sampled_from(["none", "cut", "shape", "parameter", "classification"]))
    if change == "cut":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif change == "shape":
        request.inputs[0].shape[draw(st.integers(0, 3))] = draw(st.integers(-1, 64))
    elif change == "parameter":
        request.parameters[draw(parameter_names)].CopyFrom(draw(parameter_values()))
    elif change == "classification":
        request.outputs.add(name="logits").parameters["classification"].CopyFrom(draw(parameter_values()))
    request.raw_input_contents.append(raw)
    return request


@st.composite
def classify_requests(draw: st.DrawFn) -> cpb.ClassifyRequest:
    request = cpb.ClassifyRequest(model_name=draw(names), id=draw(st.text(max_size=8)))
    request.top_k = draw(st.integers(0, (1 << 32) - 1))
    if draw(st.booleans()):
        request.images.extend(draw(st.lists(image_bytes, max_size=4)))
    if draw(st.booleans()):
        shape = draw(dims)
        request.tensor.CopyFrom(
            cpb.Tensor(datatype=draw(datatypes), shape=shape, data=draw(st.binary(max_size=64)))
        )
    return request


@pytest.fixture(scope="module")
def stubs(grpc_server):
    with grpc.insecure_channel(grpc_server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel), classifier_pb2_grpc.ClassifierStub(channel), channel


def _code(call, request) -> grpc.StatusCode:
    try:
        call(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        assert len(exc.details() or "") <= 1100
        return exc.code()
    return grpc.StatusCode.OK


@FUZZ
@given(request=st.one_of(infer_requests(), nearly_valid_infer_requests()))
def test_model_infer_ends_with_a_documented_status(stubs, request: pb.ModelInferRequest) -> None:
    code = _code(stubs[0].ModelInfer, request)
    SEEN[f"ModelInfer {code.name}"] += 1
    assert code in DOCUMENTED


@FUZZ
@given(request=classify_requests())
def test_classify_ends_with_a_documented_status(stubs, request: cpb.ClassifyRequest) -> None:
    code = _code(stubs[1].Classify, request)
    SEEN[f"Classify {code.name}"] += 1
    assert code in DOCUMENTED


@FUZZ
@given(data=st.binary(max_size=512))
def test_raw_bytes_as_a_message_end_with_a_documented_status(stubs, data: bytes) -> None:
    for path in ("/inference.GRPCInferenceService/ModelInfer", "/hrnet.v1.Classifier/Classify"):
        call = stubs[2].unary_unary(path, request_serializer=bytes, response_deserializer=bytes)
        code = _code(call, data)
        SEEN[f"raw bytes {code.name}"] += 1
        assert code in DOCUMENTED


@FUZZ
@given(requests=st.lists(st.one_of(classify_requests(), infer_requests()), min_size=1, max_size=6))
def test_streams_answer_every_request_and_end(stubs, requests: list) -> None:
    """Each stream request gets one answer, in its own error field when it fails; the call ends OK."""
    kserve, classifier, _ = stubs
    infer = [r for r in requests if isinstance(r, pb.ModelInferRequest)]
    classify = [r for r in requests if isinstance(r, cpb.ClassifyRequest)]
    started = time.monotonic()
    assert len(list(kserve.ModelStreamInfer(iter(infer), timeout=CALL_TIMEOUT_S))) == len(infer)
    assert len(list(classifier.ClassifyStream(iter(classify), timeout=CALL_TIMEOUT_S))) == len(classify)
    # Both calls within one call's deadline: milliseconds here, a hung stream reaches 30 s.
    assert time.monotonic() - started < CALL_TIMEOUT_S
    SEEN["stream requests"] += len(requests)


def test_zz_report_what_the_fuzzer_saw(grpc_server, capsys) -> None:
    """Printed with -s: the example counts by outcome. The server is still up and answering."""
    with grpc.insecure_channel(grpc_server.address) as channel:
        assert pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10).live
    with capsys.disabled():
        print(f"\nfuzz: {EXAMPLES} examples per test; outcomes: {dict(sorted(SEEN.items()))}")
