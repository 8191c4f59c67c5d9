"""UINT8 pixel tensors, normalized on the server: the same model input, and logits, as FP32."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos import classifier_pb2, classifier_pb2_grpc
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from serving.engine.preprocess import PreprocessSpec, decode_image, normalize, preprocess_array, resize_crop

SPEC = PreprocessSpec(32, 36, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _crops(digit_images, spec: PreprocessSpec = SPEC) -> np.ndarray:
    """uint8 NHWC crops: what a client that resizes and crops itself would send."""
    return np.stack([resize_crop(decode_image(d.png), spec) for d in digit_images[:3]])


def test_normalizing_uint8_pixels_equals_the_eval_transform(digit_images) -> None:
    crops = _crops(digit_images)
    expected = np.stack([preprocess_array(decode_image(d.png), SPEC) for d in digit_images[:3]])
    nhwc = normalize(crops, SPEC, channels_last=True, out=np.empty(expected.shape, np.float32))
    nchw = normalize(
        np.ascontiguousarray(crops.transpose(0, 3, 1, 2)), SPEC, False, np.empty(expected.shape, np.float32)
    )
    np.testing.assert_array_equal(nhwc, expected)
    np.testing.assert_array_equal(nchw, expected)
    half = normalize(crops, SPEC, channels_last=True, out=np.empty(expected.shape, np.float16))
    np.testing.assert_array_equal(half, expected.astype(np.float16))


def _infer(stub, datatype: str, array: np.ndarray, typed: bool = False) -> np.ndarray:
    request = pb.ModelInferRequest(model_name="hrnet")
    tensor = request.inputs.add(name="image", datatype=datatype, shape=array.shape)
    if typed:
        tensor.contents.uint_contents.extend(array.ravel().tolist())
    else:
        request.raw_input_contents.append(array.tobytes())
    response = stub.ModelInfer(request, timeout=30)
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(array.shape[0], -1)


def _model_spec(stub) -> PreprocessSpec:
    config = stub.ModelConfig(pb.ModelConfigRequest(name="hrnet"), timeout=30).config.parameters
    floats = [tuple(float(x) for x in config[k].string_value.split(",")) for k in ("mean", "std")]
    return PreprocessSpec(
        int(config["input_size"].string_value), int(config["resize_size"].string_value), *floats
    )


def test_uint8_nhwc_and_nchw_give_the_fp32_logits(grpc_server, digit_images) -> None:
    with grpc.insecure_channel(grpc_server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        spec = _model_spec(stub)
        crops = _crops(digit_images, spec)
        fp32 = normalize(crops, spec, channels_last=True, out=np.empty((3, 3, 32, 32), np.float32))
        reference = _infer(stub, "FP32", fp32)
        np.testing.assert_allclose(_infer(stub, "UINT8", crops), reference, rtol=1e-6, atol=1e-6)
        nchw = np.ascontiguousarray(crops.transpose(0, 3, 1, 2))
        np.testing.assert_allclose(_infer(stub, "UINT8", nchw), reference, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(_infer(stub, "UINT8", crops, typed=True), reference, rtol=1e-6, atol=1e-6)
        classify = classifier_pb2_grpc.ClassifierStub(channel).Classify(
            classifier_pb2.ClassifyRequest(
                model_name="hrnet",
                tensor=classifier_pb2.Tensor(datatype="UINT8", shape=crops.shape, data=crops.tobytes()),
                top_k=1,
            ),
            timeout=30,
        )
        assert [r.classes[0].index for r in classify.results] == reference.argmax(axis=1).tolist()


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 32, 3, 32), "expected shape [-1, 3, 32, 32] or [-1, 32, 32, 3]"),
        ((1, 3, 32), "expected shape [-1, 3, 32, 32] or [-1, 32, 32, 3]"),
    ],
)
def test_uint8_of_another_shape_is_refused(grpc_server, shape, message) -> None:
    with grpc.insecure_channel(grpc_server.address) as channel, pytest.raises(grpc.RpcError) as info:
        _infer(pb_grpc.GRPCInferenceServiceStub(channel), "UINT8", np.zeros(shape, np.uint8))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_typed_uint8_values_must_be_bytes(grpc_server) -> None:
    request = pb.ModelInferRequest(model_name="hrnet")
    tensor = request.inputs.add(name="image", datatype="UINT8", shape=[1, 32, 32, 3])
    tensor.contents.uint_contents.extend([256] + [0] * (32 * 32 * 3 - 1))
    with grpc.insecure_channel(grpc_server.address) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UINT8 values must lie in 0..255" in info.value.details()


def test_uint8_by_shared_memory(grpc_server, digit_images) -> None:
    """A quarter of the FP32 bytes in the client's region, normalized on the server."""
    path = Path("/dev/shm") / f"hrnet_test_{uuid.uuid4().hex}"
    with grpc.insecure_channel(grpc_server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        crops = _crops(digit_images, _model_spec(stub))
        path.write_bytes(crops.tobytes())
        try:
            stub.SystemSharedMemoryRegister(
                pb.SystemSharedMemoryRegisterRequest(name="pixels", key=path.name, byte_size=crops.nbytes)
            )
            request = pb.ModelInferRequest(model_name="hrnet")
            tensor = request.inputs.add(name="image", datatype="UINT8", shape=crops.shape)
            tensor.parameters["shared_memory_region"].string_param = "pixels"
            tensor.parameters["shared_memory_byte_size"].int64_param = crops.nbytes
            by_reference = stub.ModelInfer(request, timeout=30)
            by_value = _infer(stub, "UINT8", crops)
        finally:
            stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="pixels"))
            path.unlink()
    logits = np.frombuffer(by_reference.raw_output_contents[0], np.float32).reshape(3, -1)
    np.testing.assert_array_equal(logits, by_value)


def test_uint8_as_rest_json_gives_the_fp32_logits_and_refuses_out_of_range(grpc_server, digit_images) -> None:
    with grpc.insecure_channel(grpc_server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        crops = _crops(digit_images, _model_spec(stub))
        reference = _infer(stub, "UINT8", crops)

    def post(values: list) -> tuple[int, dict]:
        tensor = {"name": "image", "datatype": "UINT8", "shape": list(crops.shape), "data": values}
        request = urllib.request.Request(
            f"http://{grpc_server.http_address}/v2/models/hrnet/infer",
            data=json.dumps({"inputs": [tensor]}).encode(),
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    status, answer = post(crops.ravel().tolist())
    assert status == 200
    logits = np.array(answer["outputs"][0]["data"], np.float32).reshape(reference.shape)
    np.testing.assert_allclose(logits, reference, rtol=1e-6, atol=1e-6)
    status, answer = post([256, *crops.ravel().tolist()[1:]])  # would wrap to 0 if cast blindly
    assert status == 400 and "UINT8 values must be integers in 0..255" in answer["error"]
