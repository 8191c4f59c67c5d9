"""Protobuf <-> numpy for both APIs. Pure functions; every malformed request is an InvalidArgument
whose message quotes the offending value (cut short: `serving.errors.quote`).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from protos import DEFAULT_TOP_K, classifier_pb2, grpc_service_pb2
from serving.engine.service import InferInput
from serving.engine.shm import SharedMemoryRegistry, ShmRef
from serving.errors import InferenceFailed, InvalidArgument, quote

# UINT8 is pixels, normalized on the server (serving.engine.service explains the layouts).
DATATYPES = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"), "UINT8": np.dtype("u1")}
SHM_REGION = "shared_memory_region"
SHM_OFFSET = "shared_memory_offset"
SHM_BYTE_SIZE = "shared_memory_byte_size"
# KServe request parameters this server reads; any other name is refused, so a misspelling
# (`timout`) fails loudly instead of being ignored.
REQUEST_PARAMETERS = ("priority", "timeout")
MAX_RANK = 8  # dimensions a request tensor may declare; ours take 4 (NCHW) or 1 (BYTES)
# Elements a declared shape may span, zero dimensions aside: far above any message, far below
# what overflows numpy (a shape like [0, 2**40, 2**40] is empty, yet numpy refuses to make it).
MAX_SPAN = 1 << 40


@dataclass(frozen=True)
class InferOptions:
    timeout_s: float | None  # `timeout` parameter, seconds in the queue
    priority: int  # 0: default; 1 is the highest level
    classification_k: int  # 0: return the logits tensor
    output_region: ShmRef | None = None  # write the logits there instead of into the response


def _shape(dims: list[int], what: str) -> tuple[int, ...]:
    if not dims or len(dims) > MAX_RANK or any(d < 0 for d in dims):
        raise InvalidArgument(
            f"{what}: shape {quote(list(dims))} must have 1 to {MAX_RANK} dimensions, each >= 0"
        )
    if math.prod(max(int(d), 1) for d in dims) > MAX_SPAN:
        raise InvalidArgument(f"{what}: shape {list(dims)} is larger than any tensor this server accepts")
    return tuple(int(d) for d in dims)


RAW_INPUT_CONTENTS = 7  # ModelInferRequest's field number (protos/grpc_service.proto)


class InferRequest:
    """A ModelInferRequest whose `raw_input_contents` are memoryviews into the bytes gRPC
    delivered; every other field is the parsed message's. Protobuf copies each raw buffer when
    it parses and again when it is read (two 600 KB copies per FP32 image at 224)."""

    __slots__ = ("message", "raw_input_contents")

    def __init__(self, message: grpc_service_pb2.ModelInferRequest, raw: list[memoryview]) -> None:
        self.message = message
        self.raw_input_contents = raw

    def __getattr__(self, name: str) -> object:
        return getattr(self.message, name)


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def parse_infer_request(data: bytes) -> InferRequest:
    """ModelInfer's request deserializer: the top-level fields are walked, the raw buffers kept
    in place, the rest (names, shapes, parameters: small) parsed by protobuf. Raises on bytes
    that are no valid message, as protobuf's own parser does."""
    view = memoryview(data)
    raw: list[memoryview] = []
    kept: list[memoryview] = []
    pos = 0
    while pos < len(view):
        start = pos
        key, pos = _varint(view, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(view, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(view, pos)
            if key >> 3 == RAW_INPUT_CONTENTS:
                if pos + length > len(view):
                    raise ValueError("truncated raw_input_contents")
                raw.append(view[pos : pos + length])
                pos += length
                continue
            pos += length
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(view):
            raise ValueError("truncated field")
        kept.append(view[start:pos])
    return InferRequest(grpc_service_pb2.ModelInferRequest.FromString(b"".join(kept)), raw)


# Typed contents accepted per datatype: the field, and the value range (None: any float).
TYPED_CONTENTS = {"FP32": ("fp32_contents", None, None), "UINT8": ("uint_contents", 0, 255)}


def split_bytes_elements(raw: bytes | np.ndarray, what: str) -> list[bytes]:
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
        out.append(bytes(raw[pos : pos + size]))
        pos += size
    return out


def join_bytes_elements(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def shm_ref(parameters: Mapping[str, grpc_service_pb2.InferParameter], what: str) -> ShmRef | None:
    """The tensor's shared-memory reference, when its parameters name a region."""
    if SHM_REGION not in parameters:
        extra = [key for key in (SHM_OFFSET, SHM_BYTE_SIZE) if key in parameters]
        if extra:
            raise InvalidArgument(f"{what}: {extra[0]} given without {SHM_REGION}")
        return None
    region = parameters[SHM_REGION]
    if region.WhichOneof("parameter_choice") != "string_param":
        raise InvalidArgument(f"{what}: parameter {SHM_REGION!r} must be a string")
    if SHM_BYTE_SIZE not in parameters:
        raise InvalidArgument(f"{what}: {SHM_REGION} needs {SHM_BYTE_SIZE}")
    byte_size = _int_param(parameters[SHM_BYTE_SIZE], SHM_BYTE_SIZE)
    offset = _int_param(parameters[SHM_OFFSET], SHM_OFFSET) if SHM_OFFSET in parameters else 0
    if byte_size < 0 or offset < 0:
        raise InvalidArgument(f"{what}: {SHM_OFFSET} {offset} and {SHM_BYTE_SIZE} {byte_size} must be >= 0")
    return ShmRef(region.string_param, offset, byte_size)


def decode_infer_request(
    request: grpc_service_pb2.ModelInferRequest | InferRequest,
    input_name: str,
    regions: SharedMemoryRegistry | None = None,
) -> InferInput:
    """The request's one input; its data comes from `raw_input_contents`, typed contents or a
    registered shared-memory region (`regions`)."""
    if len(request.inputs) != 1:
        names = [i.name for i in request.inputs]
        raise InvalidArgument(f"expected exactly one input {input_name!r}, got {len(names)}: {quote(names)}")
    tensor = request.inputs[0]
    what = f"input {quote(tensor.name)}"
    if tensor.name != input_name:
        raise InvalidArgument(f"unknown input {quote(tensor.name)}; the model's input is {input_name!r}")
    raw = list(request.raw_input_contents)
    if raw and len(raw) != 1:
        raise InvalidArgument(f"raw_input_contents has {len(raw)} buffers for 1 input")
    if raw and tensor.HasField("contents"):
        raise InvalidArgument(f"{what}: both raw_input_contents and typed contents given; use one")
    shape = _shape(list(tensor.shape), what)
    count = math.prod(shape)
    dtype = DATATYPES.get(tensor.datatype)
    if dtype is None and tensor.datatype != "BYTES":
        raise InvalidArgument(
            f"{what}: datatype {quote(tensor.datatype)} not supported; use FP32, FP16, UINT8 or BYTES"
        )
    source = "raw content"
    ref = shm_ref(tensor.parameters, what)
    if ref is not None:
        if raw or tensor.HasField("contents"):
            raise InvalidArgument(f"{what}: data given both in shared memory and in the request; use one")
        if regions is None:
            raise InvalidArgument(f"{what}: shared memory is not available on this endpoint")
        if dtype is not None and ref.byte_size != count * dtype.itemsize:
            raise InvalidArgument(
                f"{what}: {SHM_BYTE_SIZE} is {ref.byte_size} but shape {list(shape)} of "
                f"{tensor.datatype} needs {count * dtype.itemsize}"
            )
        raw, source = [regions.read(ref, what)], "shared memory"
    if tensor.datatype == "BYTES":
        images = split_bytes_elements(raw[0], what) if raw else list(tensor.contents.bytes_contents)
        if len(images) != count:
            raise InvalidArgument(
                f"{what}: shape {list(shape)} holds {count} BYTES elements, got {len(images)}"
            )
        return InferInput(images=images)
    assert dtype is not None
    if raw:
        needed = count * dtype.itemsize
        if len(raw[0]) != needed:
            raise InvalidArgument(
                f"{what}: {source} is {len(raw[0])} bytes but shape {list(shape)} of {tensor.datatype} "
                f"needs {needed}"
            )
        array = np.frombuffer(raw[0], dtype=dtype).reshape(shape)
    elif tensor.datatype in TYPED_CONTENTS:
        field, low, high = TYPED_CONTENTS[tensor.datatype]
        values = getattr(tensor.contents, field)
        if len(values) != count:
            raise InvalidArgument(f"{what}: shape {list(shape)} needs {count} {field}, got {len(values)}")
        array = np.asarray(values, dtype=np.float64 if low is None else np.int64).reshape(shape)
        if low is not None and array.size and (array.min() < low or array.max() > high):
            raise InvalidArgument(f"{what}: {tensor.datatype} values must lie in {low}..{high}")
        array = array.astype(dtype)
    else:
        raise InvalidArgument(f"{what}: {tensor.datatype} data travels only as raw_input_contents")
    return InferInput(tensor=array.astype(dtype.newbyteorder("="), copy=False))


def _int_param(param: grpc_service_pb2.InferParameter, name: str) -> int:
    kind = param.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidArgument(f"parameter {name!r} must be an integer, got {kind or 'nothing'}")
    return int(getattr(param, kind))


def decode_options(request: grpc_service_pb2.ModelInferRequest, output_name: str) -> InferOptions:
    """Queue timeout, priority, and what to return: logits, the top k, or logits into shared memory."""
    params = request.parameters
    unknown = sorted(set(params) - set(REQUEST_PARAMETERS))
    if unknown:
        raise InvalidArgument(
            f"unknown request parameter {quote(unknown[0])}; accepted: {', '.join(REQUEST_PARAMETERS)}"
        )
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
    region = None
    for output in request.outputs:
        if output.name != output_name:
            raise InvalidArgument(
                f"unknown output {quote(output.name)}; the model's output is {output_name!r}"
            )
        if "classification" in output.parameters:
            k = _int_param(output.parameters["classification"], "classification")
            if k < 1:
                raise InvalidArgument(f"parameter 'classification' must be >= 1, got {k}")
        region = shm_ref(output.parameters, f"output {output.name!r}")
    if region is not None and k:
        raise InvalidArgument("classification results are BYTES and cannot be written to shared memory")
    return InferOptions(timeout_s, priority, k, region)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the k largest per row, best first (ties: lower index first).

    NaN has no rank: a row that is not finite fails the request rather than be ranked.
    """
    finite = np.isfinite(scores).all(axis=1)
    if not finite.all():
        row = int(np.argmin(finite))
        raise InferenceFailed(
            f"item {row}: the model's outputs are not finite (NaN or infinity), so they cannot be ranked"
        )
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
    in_shared_memory: bool = False,
) -> grpc_service_pb2.ModelInferResponse:
    """The response; with `in_shared_memory` the logits were written to the client's region and
    only their name, datatype and shape travel."""
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
        if not in_shared_memory:
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
        raise InvalidArgument(f"tensor datatype {quote(t.datatype)} not supported; use FP32, FP16 or UINT8")
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
