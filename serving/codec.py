"""Protobuf <-> numpy for both APIs. Pure functions; every malformed request is an InvalidArgument
whose message quotes the offending value.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from protos import DEFAULT_TOP_K, classifier_pb2, grpc_service_pb2
from serving.errors import InvalidArgument
from serving.service import InferInput

DATATYPES = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2")}


@dataclass(frozen=True)
class InferOptions:
    timeout_s: float | None  # `timeout` parameter, seconds in the queue
    priority: int  # 0: default; 1 is the highest level
    classification_k: int  # 0: return the logits tensor


def _shape(dims: list[int], what: str) -> tuple[int, ...]:
    if not dims or any(d < 0 for d in dims):
        raise InvalidArgument(f"{what}: shape {list(dims)} must be non-empty with dimensions >= 0")
    return tuple(int(d) for d in dims)


def split_bytes_elements(raw: bytes, what: str) -> list[bytes]:
    """BYTES raw contents: each element prefixed by its 4-byte little-endian length."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise InvalidArgument(f"{what}: truncated BYTES length prefix at byte {pos} of {len(raw)}")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise InvalidArgument(
                f"{what}: BYTES element of {size} bytes at byte {pos} overruns {len(raw)} bytes"
            )
        out.append(raw[pos : pos + size])
        pos += size
    return out


def join_bytes_elements(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def decode_infer_request(request: grpc_service_pb2.ModelInferRequest, input_name: str) -> InferInput:
    if len(request.inputs) != 1:
        names = [i.name for i in request.inputs]
        raise InvalidArgument(f"expected exactly one input {input_name!r}, got {len(names)}: {names}")
    tensor = request.inputs[0]
    what = f"input {tensor.name!r}"
    if tensor.name != input_name:
        raise InvalidArgument(f"unknown input {tensor.name!r}; the model's input is {input_name!r}")
    raw = list(request.raw_input_contents)
    if raw and len(raw) != 1:
        raise InvalidArgument(f"raw_input_contents has {len(raw)} buffers for 1 input")
    if raw and tensor.HasField("contents"):
        raise InvalidArgument(f"{what}: both raw_input_contents and typed contents given; use one")
    shape = _shape(list(tensor.shape), what)
    count = math.prod(shape)
    if tensor.datatype == "BYTES":
        images = split_bytes_elements(raw[0], what) if raw else list(tensor.contents.bytes_contents)
        if len(images) != count:
            raise InvalidArgument(
                f"{what}: shape {list(shape)} holds {count} BYTES elements, got {len(images)}"
            )
        return InferInput(images=images)
    dtype = DATATYPES.get(tensor.datatype)
    if dtype is None:
        raise InvalidArgument(f"{what}: datatype {tensor.datatype!r} not supported; use FP32, FP16 or BYTES")
    if raw:
        needed = count * dtype.itemsize
        if len(raw[0]) != needed:
            raise InvalidArgument(
                f"{what}: raw content is {len(raw[0])} bytes but shape {list(shape)} of {tensor.datatype} "
                f"needs {needed}"
            )
        array = np.frombuffer(raw[0], dtype=dtype).reshape(shape)
    elif tensor.datatype == "FP32":
        values = tensor.contents.fp32_contents
        if len(values) != count:
            raise InvalidArgument(
                f"{what}: shape {list(shape)} needs {count} fp32_contents, got {len(values)}"
            )
        array = np.asarray(values, dtype=np.float32).reshape(shape)
    else:
        raise InvalidArgument(f"{what}: FP16 data travels only as raw_input_contents")
    return InferInput(tensor=array.astype(dtype.newbyteorder("="), copy=False))


def _int_param(param: grpc_service_pb2.InferParameter, name: str) -> int:
    kind = param.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidArgument(f"parameter {name!r} must be an integer, got {kind or 'nothing'}")
    return int(getattr(param, kind))


def decode_options(request: grpc_service_pb2.ModelInferRequest, output_name: str) -> InferOptions:
    params = request.parameters
    timeout_s = None
    if "timeout" in params:
        timeout_us = _int_param(params["timeout"], "timeout")
        if timeout_us <= 0:
            raise InvalidArgument(f"parameter 'timeout' must be > 0 microseconds, got {timeout_us}")
        timeout_s = timeout_us / 1e6
    priority = _int_param(params["priority"], "priority") if "priority" in params else 0
    if priority < 0:
        raise InvalidArgument(f"parameter 'priority' must be >= 0, got {priority}")
    k = 0
    for output in request.outputs:
        if output.name != output_name:
            raise InvalidArgument(f"unknown output {output.name!r}; the model's output is {output_name!r}")
        if "classification" in output.parameters:
            k = _int_param(output.parameters["classification"], "classification")
            if k < 1:
                raise InvalidArgument(f"parameter 'classification' must be >= 1, got {k}")
    return InferOptions(timeout_s, priority, k)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the k largest per row, best first (ties: lower index first)."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def encode_infer_response(
    request: grpc_service_pb2.ModelInferRequest,
    version: str,
    output_name: str,
    logits: np.ndarray,
    k: int,
    labels: list[str],
) -> grpc_service_pb2.ModelInferResponse:
    response = grpc_service_pb2.ModelInferResponse(
        model_name=request.model_name, model_version=version, id=request.id
    )
    out = response.outputs.add(name=output_name)
    if k:
        # The classification extension: "score:index:label" per class, best first.
        order, values = top_k(logits, k)
        items = [
            f"{float(v):f}:{int(i)}:{labels[int(i)]}".encode()
            for row_i, row_v in zip(order, values, strict=True)
            for i, v in zip(row_i, row_v, strict=True)
        ]
        out.datatype = "BYTES"
        out.shape.extend([logits.shape[0], order.shape[1]])
        response.raw_output_contents.append(join_bytes_elements(items))
    else:
        out.datatype = "FP32"
        out.shape.extend(logits.shape)
        response.raw_output_contents.append(np.ascontiguousarray(logits, dtype="<f4").tobytes())
    return response


def decode_classify_request(request: classifier_pb2.ClassifyRequest) -> InferInput:
    has_tensor = request.HasField("tensor")
    if bool(request.images) == has_tensor:
        raise InvalidArgument("send either images or a tensor, not both and not neither")
    if request.images:
        return InferInput(images=list(request.images))
    t = request.tensor
    dtype = DATATYPES.get(t.datatype)
    if dtype is None:
        raise InvalidArgument(f"tensor datatype {t.datatype!r} not supported; use FP32 or FP16")
    shape = _shape(list(t.shape), "tensor")
    needed = math.prod(shape) * dtype.itemsize
    if len(t.data) != needed:
        raise InvalidArgument(
            f"tensor data is {len(t.data)} bytes but shape {list(shape)} of {t.datatype} needs {needed}"
        )
    return InferInput(tensor=np.frombuffer(t.data, dtype=dtype).reshape(shape))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def encode_classify_response(
    request: classifier_pb2.ClassifyRequest, name: str, version: str, logits: np.ndarray, labels: list[str]
) -> classifier_pb2.ClassifyResponse:
    response = classifier_pb2.ClassifyResponse(model_name=name, model_version=version, id=request.id)
    order, probs = top_k(softmax(logits), request.top_k or DEFAULT_TOP_K)
    for row_i, row_p in zip(order, probs, strict=True):
        result = response.results.add()
        for i, p in zip(row_i, row_p, strict=True):
            result.classes.add(index=int(i), label=labels[int(i)], score=float(p))
    return response
