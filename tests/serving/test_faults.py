"""A backend that fails on one batch fails that batch's requests only, with the reason, and the
next batch succeeds. The backend is real: onnxruntime running a model whose graph fails at run
time for some inputs (a Gather whose index comes from the data), nothing mocked."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc

SIZE, CLASSES = 16, 5
POISON = 250.0  # an input holding this value makes the whole batch fail in onnxruntime


def _poisonable_onnx(path: Path) -> None:
    """A tiny classifier plus Gather([0], floor(max(batch) / 100)): index 0 for ordinary inputs,
    out of range (a run-time error) for a batch that holds a value of 100 or more."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.normal(0, 0.5, (3, CLASSES)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.zeros(1, np.float32), "table"),
        numpy_helper.from_array(np.array(100.0, np.float32), "hundred"),
    ]
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc_w"], ["scores"]),
        helper.make_node("ReduceMax", ["input"], ["peak"], keepdims=0),
        helper.make_node("Div", ["peak", "hundred"], ["scaled"]),
        helper.make_node("Floor", ["scaled"], ["floored"]),
        helper.make_node("Cast", ["floored"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "index"], ["zero"], axis=0),
        helper.make_node("Add", ["scores", "zero"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "poisonable",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))


def _request(batch: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="poisonable")
    request.inputs.add(name="input", datatype="FP32", shape=list(batch.shape))
    request.raw_input_contents.append(batch.tobytes())
    return request


def _batch(value: float | None = None, seed: int = 0) -> np.ndarray:
    batch = np.random.default_rng(seed).uniform(0, 1, (1, 3, SIZE, SIZE)).astype(np.float32)
    if value is not None:
        batch[0, 0, 0, 0] = value
    return batch


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    _poisonable_onnx(root / "poisonable" / "1" / "model.onnx")
    return root


def _outcome(stub: pb_grpc.GRPCInferenceServiceStub, batch: np.ndarray) -> tuple[grpc.StatusCode, str]:
    try:
        stub.ModelInfer(_request(batch), timeout=30)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def test_a_failing_batch_fails_only_its_own_requests(repo, start_server) -> None:
    server = start_server(repo, max_batch_size=1, max_queue_size=64)  # one request per batch
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        code, message = _outcome(stub, _batch(POISON))
        assert code == grpc.StatusCode.INTERNAL
        assert message.startswith("inference failed: ") and "Gather" in message  # onnxruntime's reason
        assert _outcome(stub, _batch()) == (grpc.StatusCode.OK, "")  # the next batch succeeds
        values = [POISON if i % 4 == 0 else None for i in range(16)]
        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(lambda i: _outcome(stub, _batch(values[i], i)), range(16)))
    assert [code for code, _ in outcomes] == [
        grpc.StatusCode.INTERNAL if value else grpc.StatusCode.OK for value in values
    ]
    assert server.metric("hrnet_requests_total", model="poisonable", code="INTERNAL") == 5


def test_requests_batched_with_a_failing_one_share_its_error(repo, start_server) -> None:
    # Batches wait 300 ms for company, so these four run as one batch of four.
    server = start_server(repo, max_batch_size=4, max_queue_delay_us=300_000, adaptive_delay=False)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with ThreadPoolExecutor(4) as pool:
            batch = [_batch(POISON if i == 2 else None, i) for i in range(4)]
            outcomes = list(pool.map(lambda b: _outcome(stub, b), batch))
        assert {code for code, _ in outcomes} == {grpc.StatusCode.INTERNAL}
        assert len({message for _, message in outcomes}) == 1  # one reason, told to each of them
        assert _outcome(stub, _batch()) == (grpc.StatusCode.OK, "")
