"""Everything the blocking and the asyncio client share: requests, responses, deadlines, ordering.

Each public method becomes a `UnaryCall` (which RPC, the request, how to turn the response into
a result) built here; `Client` and `AsyncClient` only run it, with their own way to wait between
retries. So the two clients cannot drift apart: there is one place that knows the protocol.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
import numpy as np

from clients.channel import (
    TlsConfig,
    call_metadata,
    channel_options,
    parse_target,
    warn_if_cleartext_token,
)
from clients.errors import ClientError
from clients.images import ImageInput, encode_image, encode_images
from clients.results import Classification, InferResult, ModelInfo, Prediction, StreamResult, TensorSpec
from clients.retry import RetryPolicy
from protos import classifier_pb2 as cpb
from protos import grpc_service_pb2 as kpb
from protos import health_pb2 as hpb

T = TypeVar("T")
log = logging.getLogger("clients")

DEFAULT_TARGET = "127.0.0.1:8001"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_IN_FLIGHT = 8
ONLY_IMAGE = "image 0: "  # how the server names the first (here: only) image of a request

# Raw tensor encodings (KServe datatypes, little-endian) the client reads and writes.
_NUMPY_DTYPES = {
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# FP32/FP16: preprocessed NCHW; UINT8: resized and cropped pixels, NCHW or NHWC (normalized by the server).
_INFER_INPUT_DTYPES = {np.dtype("float32"): "FP32", np.dtype("float16"): "FP16", np.dtype("uint8"): "UINT8"}


@dataclass(frozen=True)
class Rpc:
    """One method of the API: its path and how its messages travel (no generated stubs needed)."""

    path: str
    request_serializer: Callable[[Any], bytes]
    response_deserializer: Callable[[bytes], Any]
    streaming: bool = False


def _rpc(path: str, request: Any, response: Any, streaming: bool = False) -> Rpc:
    return Rpc(path, request.SerializeToString, response.FromString, streaming)


CLASSIFY = _rpc("/hrnet.v1.Classifier/Classify", cpb.ClassifyRequest, cpb.ClassifyResponse)
CLASSIFY_STREAM = _rpc("/hrnet.v1.Classifier/ClassifyStream", cpb.ClassifyRequest, cpb.ClassifyResponse, True)
SERVER_LIVE = _rpc(
    "/inference.GRPCInferenceService/ServerLive", kpb.ServerLiveRequest, kpb.ServerLiveResponse
)
SERVER_READY = _rpc(
    "/inference.GRPCInferenceService/ServerReady", kpb.ServerReadyRequest, kpb.ServerReadyResponse
)
MODEL_READY = _rpc(
    "/inference.GRPCInferenceService/ModelReady", kpb.ModelReadyRequest, kpb.ModelReadyResponse
)
MODEL_METADATA = _rpc(
    "/inference.GRPCInferenceService/ModelMetadata", kpb.ModelMetadataRequest, kpb.ModelMetadataResponse
)
MODEL_INFER = _rpc(
    "/inference.GRPCInferenceService/ModelInfer", kpb.ModelInferRequest, kpb.ModelInferResponse
)
# gRPC's standard health service, with wire-identical messages of our own (protos/health.proto).
HEALTH_CHECK = _rpc("/grpc.health.v1.Health/Check", hpb.HealthCheckRequest, hpb.HealthCheckResponse)
RPCS = (
    CLASSIFY,
    CLASSIFY_STREAM,
    SERVER_LIVE,
    SERVER_READY,
    MODEL_READY,
    MODEL_METADATA,
    MODEL_INFER,
    HEALTH_CHECK,
)


@dataclass(frozen=True)
class UnaryCall(Generic[T]):
    rpc: Rpc
    request: Any
    parse: Callable[[Any, float], T]  # (response, latency_s) -> result


class Deadline:
    """A per-call time budget that covers every attempt of a retried call."""

    def __init__(self, timeout_s: float | None) -> None:
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s}")
        self._end = None if timeout_s is None else time.monotonic() + timeout_s

    def remaining_s(self) -> float | None:
        return None if self._end is None else max(0.0, self._end - time.monotonic())


class ClientCore:
    """Settings and protocol logic of one client; no I/O."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        model: str | None,
        timeout_s: float | None,
        retry: RetryPolicy,
        tls: TlsConfig | None,
        token: str | None,
        max_message_bytes: int,
    ) -> None:
        self.target = parse_target(target)
        if max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be at least 1024, got {max_message_bytes}")
        Deadline(timeout_s)  # validates
        warn_if_cleartext_token(token, tls, self.target)
        self.model = model
        self.timeout_s = timeout_s
        self.retry = retry
        self.metadata = call_metadata(token)
        self.options = channel_options(tls, max_message_bytes, retry.max_backoff_s, self.target)
        self.credentials = tls.credentials() if tls is not None else None

    def open_channel(self, grpc_module: Any) -> tuple[Any, dict[str, Any]]:
        """A channel to the target and a callable per RPC path, from `grpc` or `grpc.aio` alike.

        Both modules offer the same channel constructors and method factories; only what the
        callables return (a value or an awaitable) differs, and that is the wrappers' business.
        """
        if self.credentials is None:
            channel = grpc_module.insecure_channel(self.target.uri, options=self.options)
        else:
            channel = grpc_module.secure_channel(self.target.uri, self.credentials, options=self.options)
        methods = {}
        for rpc in RPCS:
            factory = channel.stream_stream if rpc.streaming else channel.unary_unary
            methods[rpc.path] = factory(
                rpc.path,
                request_serializer=rpc.request_serializer,
                response_deserializer=rpc.response_deserializer,
            )
        return channel, methods

    # --- per-call settings -------------------------------------------------------------------

    def deadline(self, timeout_s: float | None) -> Deadline:
        return Deadline(self.timeout_s if timeout_s is None else timeout_s)

    def model_name(self, model: str | None) -> str:
        """The call's model, else the client's; empty asks the server for its default model."""
        return model if model is not None else (self.model or "")

    def retry_wait_s(
        self, call: UnaryCall[Any], attempt: int, error: ClientError, deadline: Deadline
    ) -> float | None:
        """Seconds to wait before retrying a failed attempt, or None to raise `error` now."""
        wait_s = self.retry.next_wait_s(attempt, error.code, deadline.remaining_s(), error.message)
        if wait_s is not None:
            log.info(
                "%s failed (%s), attempt %d of %d; retrying in %.2f s",
                call.rpc.path,
                error,
                attempt,
                self.retry.max_attempts,
                wait_s,
            )
        return wait_s

    # --- Classify ----------------------------------------------------------------------------

    def classify_call(
        self, images: list[ImageInput], top_k: int, model: str | None, version: str | int | None = None
    ) -> UnaryCall[list[Classification]]:
        if not images:
            raise ValueError("classify() needs at least one image")
        request = cpb.ClassifyRequest(
            model_name=self.model_name(model),
            model_version=_version(version),
            images=encode_images(images),
            top_k=_check_top_k(top_k),
        )
        expected = len(images)

        def parse(response: cpb.ClassifyResponse, latency_s: float) -> list[Classification]:
            if len(response.results) != expected:
                raise ClientError(
                    grpc.StatusCode.INTERNAL,
                    f"the server returned {len(response.results)} results for {expected} images",
                )
            return _classifications(response, latency_s)

        return UnaryCall(CLASSIFY, request, parse)

    # --- ClassifyStream ----------------------------------------------------------------------

    def stream_request(
        self, index: int, image: ImageInput, top_k: int, model: str | None, version: str | int | None = None
    ) -> cpb.ClassifyRequest:
        return cpb.ClassifyRequest(
            model_name=self.model_name(model),
            model_version=_version(version),
            id=str(index),
            images=[encode_image(image)],
            top_k=top_k,
        )

    @staticmethod
    def check_stream_args(top_k: int, max_in_flight: int, version: str | int | None = None) -> None:
        _check_top_k(top_k)
        _version(version)
        if not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError(f"max_in_flight must be a positive integer, got {max_in_flight!r}")

    # --- KServe: health, metadata, raw tensors -------------------------------------------------

    @staticmethod
    def server_live_call() -> UnaryCall[bool]:
        return UnaryCall(SERVER_LIVE, kpb.ServerLiveRequest(), lambda response, _: bool(response.live))

    @staticmethod
    def server_ready_call() -> UnaryCall[bool]:
        return UnaryCall(SERVER_READY, kpb.ServerReadyRequest(), lambda response, _: bool(response.ready))

    def model_ready_call(self, model: str | None) -> UnaryCall[bool]:
        request = kpb.ModelReadyRequest(name=self.model_name(model))
        return UnaryCall(MODEL_READY, request, lambda response, _: bool(response.ready))

    @staticmethod
    def health_check_call(service: str) -> UnaryCall[str]:
        """grpc.health.v1 Check: SERVING, NOT_SERVING or UNKNOWN (NOT_FOUND for a service never set)."""
        name = hpb.HealthCheckResponse.ServingStatus.Name
        return UnaryCall(HEALTH_CHECK, hpb.HealthCheckRequest(service=service), lambda r, _: name(r.status))

    def model_metadata_call(self, model: str | None) -> UnaryCall[ModelInfo]:
        request = kpb.ModelMetadataRequest(name=self.model_name(model))
        return UnaryCall(MODEL_METADATA, request, _model_info)

    @staticmethod
    def infer_call(tensor: np.ndarray, info: ModelInfo) -> UnaryCall[InferResult]:
        """ModelInfer for the model `info` describes (from model_metadata: its name and input)."""
        tensor = _check_tensor(tensor)
        if len(info.inputs) != 1:
            raise ClientError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {info.name!r} has {len(info.inputs)} inputs; infer() sends one image tensor",
            )
        request = kpb.ModelInferRequest(model_name=info.name)
        request.inputs.add(
            name=info.inputs[0].name, datatype=_INFER_INPUT_DTYPES[tensor.dtype], shape=tensor.shape
        )
        request.raw_input_contents.append(tensor.astype(tensor.dtype.newbyteorder("<"), copy=False).tobytes())
        return UnaryCall(MODEL_INFER, request, _infer_result)


def _check_top_k(top_k: int) -> int:
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    return top_k


def _check_tensor(tensor: np.ndarray) -> np.ndarray:
    if not isinstance(tensor, np.ndarray):
        raise TypeError(f"infer() takes a numpy array, got {type(tensor).__name__}")
    if tensor.dtype not in _INFER_INPUT_DTYPES:
        raise TypeError(
            f"infer() sends FP32, FP16 or UINT8 tensors, got {tensor.dtype}; convert with .astype(np.float32)"
        )
    pixels_last = tensor.dtype == np.uint8 and tensor.ndim == 4 and tensor.shape[3] == 3
    if tensor.ndim != 4 or (tensor.shape[1] != 3 and not pixels_last):
        raise ValueError(
            f"infer() takes a preprocessed NCHW batch (N, 3, H, W), or UINT8 pixels (N, 3, H, W) or "
            f"(N, H, W, 3), got shape {tensor.shape}; add the batch axis of a single image with tensor[None]"
        )
    return np.ascontiguousarray(tensor)


def _classifications(response: cpb.ClassifyResponse, latency_s: float) -> list[Classification]:
    return [
        Classification(
            predictions=tuple(Prediction(int(c.index), c.label, float(c.score)) for c in result.classes),
            model_name=response.model_name,
            model_version=response.model_version,
            latency_s=latency_s,
        )
        for result in response.results
    ]


def _tensor_specs(tensors: Iterable[Any]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(t.name, t.datatype, tuple(int(d) for d in t.shape)) for t in tensors)


def _model_info(response: kpb.ModelMetadataResponse, _latency_s: float) -> ModelInfo:
    return ModelInfo(
        name=response.name,
        versions=tuple(response.versions),
        platform=response.platform,
        inputs=_tensor_specs(response.inputs),
        outputs=_tensor_specs(response.outputs),
    )


def _infer_result(response: kpb.ModelInferResponse, latency_s: float) -> InferResult:
    outputs: dict[str, np.ndarray] = {}
    for position, tensor in enumerate(response.outputs):
        dtype = _NUMPY_DTYPES.get(tensor.datatype)
        if dtype is None:
            raise ClientError(
                grpc.StatusCode.UNIMPLEMENTED, f"output {tensor.name!r} has datatype {tensor.datatype}"
            )
        shape = tuple(int(d) for d in tensor.shape)
        if position < len(response.raw_output_contents):
            array = np.frombuffer(response.raw_output_contents[position], dtype=dtype)
        else:
            array = np.asarray(_typed_contents(tensor), dtype=dtype)
        if array.size != int(np.prod(shape)):
            raise ClientError(
                grpc.StatusCode.INTERNAL,
                f"output {tensor.name!r}: {array.size} values for shape {list(shape)}",
            )
        outputs[tensor.name] = array.reshape(shape)
    return InferResult(outputs, response.model_name, response.model_version, latency_s)


def _typed_contents(tensor: Any) -> Any:
    contents = tensor.contents
    for field in ("fp32_contents", "fp64_contents", "int64_contents", "int_contents", "uint_contents"):
        values = getattr(contents, field)
        if len(values):
            return values
    return contents.bool_contents


class StreamOrder:
    """Puts out-of-order stream results back in input order, from any thread.

    Responses carry the request id and may come back in any order; callers of `classify_stream`
    get results in the order they supplied the images, each as soon as all before it are done.
    """

    def __init__(self) -> None:
        self._sent_at: dict[int, float] = {}
        self._done: dict[int, StreamResult] = {}
        self._next = 0
        self._count = 0
        self._lock = threading.Lock()

    def register(self) -> int:
        """Number the next input item and start its clock."""
        with self._lock:
            index = self._count
            self._count += 1
            self._sent_at[index] = time.perf_counter()
            return index

    def fail_locally(self, index: int, error: ClientError) -> None:
        """An item that could not even be sent (an unreadable file) keeps its place in the output."""
        with self._lock:
            self._done[index] = StreamResult(index, None, error)

    def receive(self, response: cpb.ClassifyResponse) -> None:
        index = _stream_index(response, self._count)
        with self._lock:
            latency_s = time.perf_counter() - self._sent_at.pop(index, time.perf_counter())
            self._done[index] = _stream_result(index, response, latency_s)

    def ready(self) -> list[StreamResult]:
        out = []
        with self._lock:
            while self._next in self._done:
                out.append(self._done.pop(self._next))
                self._next += 1
        return out

    def finish(self) -> list[StreamResult]:
        """Everything left once the stream has ended; items the server never answered are errors."""
        with self._lock:
            for index in range(self._next, self._count):
                if index not in self._done:
                    error = ClientError(
                        grpc.StatusCode.INTERNAL, "the stream ended without an answer for this item"
                    )
                    self._done[index] = StreamResult(index, None, error)
        return self.ready()


def _version(version: str | int | None) -> str:
    """A model version as the protocol spells it; empty asks for the newest served."""
    if version is None:
        return ""
    text = str(version)
    if not text.isdigit():
        raise ValueError(f"a model version is a positive integer, got {version!r}")
    return text


def _stream_index(response: cpb.ClassifyResponse, count: int) -> int:
    try:
        index = int(response.id)
    except ValueError:
        index = -1
    if not 0 <= index < count:
        raise ClientError(
            grpc.StatusCode.INTERNAL, f"the server answered an unknown stream id {response.id!r}"
        )
    return index


def _stream_result(index: int, response: cpb.ClassifyResponse, latency_s: float) -> StreamResult:
    if response.HasField("error") and response.error.code != 0:
        # Each stream request holds one image, so the server's "image 0: " (its position in the
        # request) only misleads: the result's own index says which input it was.
        message = response.error.message.removeprefix(ONLY_IMAGE)
        return StreamResult(index, None, ClientError.from_code_value(response.error.code, message))
    if len(response.results) != 1:
        error = ClientError(grpc.StatusCode.INTERNAL, f"expected 1 result, got {len(response.results)}")
        return StreamResult(index, None, error)
    return StreamResult(index, _classifications(response, latency_s)[0], None)
