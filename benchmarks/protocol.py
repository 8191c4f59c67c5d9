"""The two APIs a benchmark can speak, as serialized bytes: requests built once, responses read cheaply.

The load generator sends pre-serialized requests (no protobuf work per call) and reads back only
what it must: the status for unary calls, the id and error of a stream response. Both APIs keep
the request id in field 3, so a stream request gets its id by appending that one field to the
stored bytes (protobuf keeps the last value of a repeated scalar field), not by re-serializing.

`kserve` is the Open Inference Protocol, so the same load drives any KServe v2 server (Triton,
MLServer); `classifier` is our `hrnet.v1.Classifier`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from core.errors import CommandError
from protos import classifier_pb2 as cpb
from protos import grpc_service_pb2 as kpb
from protos.grpc_service_pb2_grpc import GRPCInferenceServiceStub as Stub
from serving.api.codec import join_bytes_elements

KSERVE = "kserve"
CLASSIFIER = "classifier"
APIS = (KSERVE, CLASSIFIER)
STREAM_ERROR = "STREAM_ERROR"  # a stream error whose text names no gRPC status (other servers)
_RAW_DTYPES = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2")}
_STATUS_NAMES = {code.name for code in grpc.StatusCode}
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


@dataclass(frozen=True)
class ModelInfo:
    """What a load needs to know of the served model, read from the server itself."""

    name: str
    input_name: str
    input_shape: tuple[int, ...]  # one image, (C, H, W)
    platform: str
    max_batch_size: int  # 0 when the server does not say (no ModelConfig)


def fetch_model_info(address: str, model: str = "", timeout_s: float = 10.0) -> ModelInfo:
    """ModelMetadata (and ModelConfig where the server has it) of `model`, or of its only model."""
    with grpc.insecure_channel(address) as channel:
        name = model or _only_model(channel, address, timeout_s)
        try:
            meta = Stub(channel).ModelMetadata(kpb.ModelMetadataRequest(name=name), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise CommandError(f"{address}: ModelMetadata of {name!r} failed: {_describe(exc)}") from None
        if not meta.inputs or len(meta.inputs[0].shape) < 3:
            raise CommandError(f"{address}: model {name!r} has no image input (inputs: {list(meta.inputs)})")
        shape = tuple(int(d) for d in meta.inputs[0].shape[-3:])
        return ModelInfo(
            name, meta.inputs[0].name, shape, meta.platform, _max_batch(channel, name, timeout_s)
        )


def server_name(address: str, timeout_s: float = 10.0) -> str:
    """ "triton 2.41.0", "mlserver 1.7.1", "hrnet 0.1.0": what the server says it is (ServerMetadata)."""
    with grpc.insecure_channel(address) as channel:
        try:
            meta = Stub(channel).ServerMetadata(kpb.ServerMetadataRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise CommandError(f"{address}: ServerMetadata failed: {_describe(exc)}") from None
    return f"{meta.name} {meta.version}".strip() or address


def _only_model(channel: grpc.Channel, address: str, timeout_s: float) -> str:
    try:
        stats = Stub(channel).ModelStatistics(kpb.ModelStatisticsRequest(), timeout=timeout_s)
    except grpc.RpcError as exc:
        raise CommandError(
            f"{address} cannot list its models ({_describe(exc)}); give --model-name"
        ) from None
    names = sorted({m.name for m in stats.model_stats})
    if len(names) != 1:
        raise CommandError(f"{address} serves {len(names)} models ({', '.join(names)}); give --model-name")
    return names[0]


def _max_batch(channel: grpc.Channel, name: str, timeout_s: float) -> int:
    try:
        response = Stub(channel).ModelConfig(kpb.ModelConfigRequest(name=name), timeout=timeout_s)
    except grpc.RpcError:
        return 0  # KServe servers other than Triton and ours have no ModelConfig
    return int(response.config.max_batch_size)


def _describe(exc: grpc.RpcError) -> str:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    return f"{code.name if code else 'ERROR'}: {details}"


class Api:
    """One API's methods and encodings. Subclasses fill in the message types."""

    name: str
    unary: str
    stream: str

    def tensor_request(self, model: ModelInfo, tensor: np.ndarray) -> bytes:
        raise NotImplementedError

    def images_request(self, model: ModelInfo, images: Sequence[bytes]) -> bytes:
        raise NotImplementedError

    def with_id(self, request: bytes, request_id: str) -> bytes:
        return request + self._id_field(request_id)

    def _id_field(self, request_id: str) -> bytes:
        raise NotImplementedError

    def stream_outcome(self, response: bytes) -> tuple[str, str]:
        """(request id, status name) of one stream response."""
        raise NotImplementedError

    def top_k(self, response: bytes, k: int) -> list[list[int]]:
        """Class indices, best first, of every image of a unary response."""
        raise NotImplementedError


class KServeApi(Api):
    name = KSERVE
    unary = "/inference.GRPCInferenceService/ModelInfer"
    stream = "/inference.GRPCInferenceService/ModelStreamInfer"

    def tensor_request(self, model: ModelInfo, tensor: np.ndarray) -> bytes:
        request = kpb.ModelInferRequest(model_name=model.name)
        datatype, dtype = (
            ("UINT8", "u1") if tensor.dtype == np.uint8 else ("FP32", "<f4")
        )  # pixels or normalized
        request.inputs.add(name=model.input_name, datatype=datatype, shape=tensor.shape)
        request.raw_input_contents.append(np.ascontiguousarray(tensor, dtype=dtype).tobytes())
        return request.SerializeToString()

    def images_request(self, model: ModelInfo, images: Sequence[bytes]) -> bytes:
        request = kpb.ModelInferRequest(model_name=model.name)
        request.inputs.add(name=model.input_name, datatype="BYTES", shape=[len(images)])
        request.raw_input_contents.append(join_bytes_elements(list(images)))
        return request.SerializeToString()

    def _id_field(self, request_id: str) -> bytes:
        return kpb.ModelInferRequest(id=request_id).SerializeToString()

    def stream_outcome(self, response: bytes) -> tuple[str, str]:
        message = kpb.ModelStreamInferResponse.FromString(response)
        if not message.error_message:
            return message.infer_response.id, "OK"
        # Ours writes "CODE: message"; other servers write free text.
        prefix = message.error_message.partition(":")[0].strip()
        return message.infer_response.id, prefix if prefix in _STATUS_NAMES else STREAM_ERROR

    def top_k(self, response: bytes, k: int) -> list[list[int]]:
        message = kpb.ModelInferResponse.FromString(response)
        output = message.outputs[0]
        if message.raw_output_contents:
            dtype = _RAW_DTYPES.get(output.datatype)
            if dtype is None:
                raise ValueError(f"output datatype {output.datatype} is not a float tensor")
            logits = np.frombuffer(message.raw_output_contents[0], dtype=dtype)
        else:
            logits = np.asarray(output.contents.fp32_contents, dtype=np.float32)
        logits = logits.reshape(-1, int(output.shape[-1]))
        return [list(map(int, row)) for row in np.argsort(-logits, axis=1, kind="stable")[:, :k]]


class ClassifierApi(Api):
    name = CLASSIFIER
    unary = "/hrnet.v1.Classifier/Classify"
    stream = "/hrnet.v1.Classifier/ClassifyStream"

    def __init__(self, top_k: int = 1) -> None:
        self.k = top_k  # the server sorts and labels only what is asked for

    def tensor_request(self, model: ModelInfo, tensor: np.ndarray) -> bytes:
        data = np.ascontiguousarray(tensor, dtype="<f4").tobytes()
        tensor_message = cpb.Tensor(datatype="FP32", shape=tensor.shape, data=data)
        return cpb.ClassifyRequest(
            model_name=model.name, tensor=tensor_message, top_k=self.k
        ).SerializeToString()

    def images_request(self, model: ModelInfo, images: Sequence[bytes]) -> bytes:
        return cpb.ClassifyRequest(
            model_name=model.name, images=list(images), top_k=self.k
        ).SerializeToString()

    def _id_field(self, request_id: str) -> bytes:
        return cpb.ClassifyRequest(id=request_id).SerializeToString()

    def stream_outcome(self, response: bytes) -> tuple[str, str]:
        message = cpb.ClassifyResponse.FromString(response)
        if not message.HasField("error"):
            return message.id, "OK"
        return message.id, _CODE_NAMES.get(message.error.code, STREAM_ERROR)

    def top_k(self, response: bytes, k: int) -> list[list[int]]:
        message = cpb.ClassifyResponse.FromString(response)
        return [[int(c.index) for c in result.classes[:k]] for result in message.results]


def api(name: str, top_k: int = 1) -> Api:
    if name == KSERVE:
        return KServeApi()
    if name == CLASSIFIER:
        return ClassifierApi(top_k)
    raise CommandError(f"unknown API {name!r}; use one of {', '.join(APIS)}")
