"""The system shared-memory extension through a real server: round trip, and hostile clients.

Regions are plain files in /dev/shm, which is what shm_open makes; tritonclient's own helpers
are exercised in test_tritonclient.py.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc

SHAPE = (3, 3, 32, 32)
LOGITS = 3 * 10 * 4


@pytest.fixture
def stub(grpc_server) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(grpc_server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        yield stub
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest())


@pytest.fixture
def shm_file() -> Iterator[Path]:
    path = Path("/dev/shm") / f"hrnet_test_{uuid.uuid4().hex}"
    yield path
    path.unlink(missing_ok=True)


def _register(stub, name: str, key: str, byte_size: int, offset: int = 0) -> None:
    stub.SystemSharedMemoryRegister(
        pb.SystemSharedMemoryRegisterRequest(name=name, key=key, offset=offset, byte_size=byte_size)
    )


def _params(message, region: str, byte_size: int, offset: int | None = None) -> None:
    message.parameters["shared_memory_region"].string_param = region
    message.parameters["shared_memory_byte_size"].int64_param = byte_size
    if offset is not None:
        message.parameters["shared_memory_offset"].int64_param = offset


def _request(region: str = "in", byte_size: int = 3 * 3 * 32 * 32 * 4, **extra) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="hrnet")
    tensor = request.inputs.add(name="image", datatype=extra.pop("datatype", "FP32"), shape=SHAPE)
    _params(tensor, region, byte_size, extra.pop("offset", None))
    return request


def _code(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    return info.value.code(), info.value.details()


def test_inputs_and_outputs_by_reference_round_trip(model_repo, stub, shm_file) -> None:
    rng = np.random.default_rng(3)
    batch = rng.normal(0, 1, SHAPE).astype(np.float32)
    shm_file.write_bytes(b"\0" * 64 + batch.tobytes() + b"\0" * LOGITS)  # 64 bytes the window skips
    key = "/" + shm_file.name
    _register(stub, "in", key, batch.nbytes, offset=64)
    _register(stub, "out", key, LOGITS, offset=64 + batch.nbytes)
    status = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())
    assert status.regions["out"] == pb.SystemSharedMemoryStatusResponse.RegionStatus(
        name="out", key=key, offset=64 + batch.nbytes, byte_size=LOGITS
    )
    request = _request()
    _params(request.outputs.add(name="logits"), "out", LOGITS)
    response = stub.ModelInfer(request, timeout=30)
    assert list(response.outputs[0].shape) == [3, 10] and response.outputs[0].datatype == "FP32"
    assert not response.raw_output_contents  # the logits went to shared memory only
    written = np.frombuffer(shm_file.read_bytes()[64 + batch.nbytes :], np.float32).reshape(3, 10)
    session = ort.InferenceSession(str(model_repo.onnx), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(written, session.run(None, {"image": batch})[0], rtol=1e-4, atol=1e-5)
    # An input by reference, the logits in the response.
    plain = stub.ModelInfer(_request(), timeout=30)
    in_message = np.frombuffer(plain.raw_output_contents[0], np.float32).reshape(3, 10)
    np.testing.assert_allclose(in_message, written)
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="out"))
    assert _code(stub.SystemSharedMemoryStatus, pb.SystemSharedMemoryStatusRequest(name="out"))[0] == (
        grpc.StatusCode.NOT_FOUND
    )
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="never-registered"))
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest())
    assert not stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions


@pytest.mark.parametrize(
    ("key", "offset", "byte_size", "code", "message"),
    [
        ("/../../etc/passwd", 0, 4, grpc.StatusCode.INVALID_ARGUMENT, "directly under /dev/shm"),
        ("..", 0, 4, grpc.StatusCode.INVALID_ARGUMENT, "directly under /dev/shm"),
        ("/hrnet_test_does_not_exist", 0, 4, grpc.StatusCode.INVALID_ARGUMENT, "No such file"),
        ("SELF", 0, 0, grpc.StatusCode.INVALID_ARGUMENT, "byte_size must be >= 1"),
        ("SELF", 60, 8, grpc.StatusCode.INVALID_ARGUMENT, "exceeds the 64 bytes"),
        ("SELF", 2**64 - 1, 1, grpc.StatusCode.INVALID_ARGUMENT, "exceeds the 64 bytes"),
        ("LINK", 0, 4, grpc.StatusCode.INVALID_ARGUMENT, "unable to open"),
    ],
)
def test_registration_refuses_what_is_not_a_window_of_a_shm_object(
    stub, shm_file, key, offset, byte_size, code, message
) -> None:
    shm_file.write_bytes(b"\0" * 64)
    link = shm_file.with_name(shm_file.name + "_link")
    link.symlink_to(shm_file)
    try:
        key = {"SELF": shm_file.name, "LINK": link.name}.get(key, key)
        request = pb.SystemSharedMemoryRegisterRequest(name="r", key=key, offset=offset, byte_size=byte_size)
        got, details = _code(stub.SystemSharedMemoryRegister, request)
    finally:
        link.unlink()
    assert got == code and message in details
    assert not stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions


def test_a_name_is_registered_once(stub, shm_file) -> None:
    shm_file.write_bytes(b"\0" * 64)
    _register(stub, "r", shm_file.name, 64)
    request = pb.SystemSharedMemoryRegisterRequest(name="r", key=shm_file.name, byte_size=8)
    assert _code(stub.SystemSharedMemoryRegister, request)[0] == grpc.StatusCode.ALREADY_EXISTS


def _bad_requests() -> list[tuple[pb.ModelInferRequest, str]]:
    full = 3 * 3 * 32 * 32 * 4
    cases = [
        (_request("nope"), "unable to find system shared memory region 'nope'"),
        (_request(byte_size=full - 4), f"shared_memory_byte_size is {full - 4}"),
        (_request(offset=8), "lies outside region 'in'"),
        (_request(offset=-8), "must be >= 0"),
        (_request(byte_size=-1), "must be >= 0"),
        (_request(offset=2**62), "lies outside region 'in'"),
    ]
    no_size = _request()
    del no_size.inputs[0].parameters["shared_memory_byte_size"]
    cases.append((no_size, "needs shared_memory_byte_size"))
    both = _request()
    both.raw_input_contents.append(b"\0" * full)
    cases.append((both, "both in shared memory and in the request"))
    small_out = _request()
    _params(small_out.outputs.add(name="logits"), "out", LOGITS - 4)
    cases.append((small_out, "too small for the 120 bytes"))
    ranked = _request()
    ranked_out = ranked.outputs.add(name="logits")
    _params(ranked_out, "out", LOGITS)
    ranked_out.parameters["classification"].int64_param = 2
    cases.append((ranked, "cannot be written to shared memory"))
    offset_only = _request()
    offset_only.outputs.add(name="logits").parameters["shared_memory_offset"].int64_param = 0
    cases.append((offset_only, "shared_memory_offset given without shared_memory_region"))
    return cases


def test_references_are_checked_against_their_region(grpc_server, stub, shm_file) -> None:
    full = 3 * 3 * 32 * 32 * 4
    shm_file.write_bytes(b"\0" * (full + LOGITS))
    _register(stub, "in", shm_file.name, full)
    _register(stub, "out", shm_file.name, LOGITS, offset=full)
    for request, message in _bad_requests():
        code, details = _code(stub.ModelInfer, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT or "unable to find" in details, details
        assert message in details


def test_a_client_shrinking_its_object_fails_its_own_request_only(grpc_server, stub, shm_file) -> None:
    """With a memory map, reading past the new end would kill the server with SIGBUS."""
    full = 3 * 3 * 32 * 32 * 4
    shm_file.write_bytes(b"\0" * full)
    _register(stub, "in", shm_file.name, full)
    os.truncate(shm_file, 100)
    code, details = _code(stub.ModelInfer, _request())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "shrank" in details
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
