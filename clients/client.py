"""The blocking client: one channel, safe to share between threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar, overload

import grpc
import numpy as np

from clients.channel import DEFAULT_MAX_MESSAGE_BYTES, TlsConfig
from clients.core import (
    CLASSIFY_STREAM,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT_S,
    ClientCore,
    StreamOrder,
    UnaryCall,
)
from clients.errors import ClientError
from clients.images import ImageInput, as_list, is_single
from clients.results import Classification, Health, InferResult, ModelInfo, StreamResult
from clients.retry import RetryPolicy
from protos import DEFAULT_TOP_K

T = TypeVar("T")


class Client:
    """Classify images with an hrnet server.

    >>> with Client("127.0.0.1:8001") as client:
    ...     print(client.classify("cat.jpg").label)

    Every method takes `timeout_s` (the call's deadline, retries included; default: the client's)
    and raises `ClientError` on failure. gRPC channels multiplex calls and are thread-safe, so
    one client serves a whole process.

    `target` may name several replicas: a list of HOST:PORT (or one string separated by commas),
    or `dns:///NAME:PORT` for every address NAME resolves to. Calls then go round robin over the
    replicas, one that is not SERVING gets none, and a retried call goes to the next one.
    """

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        model: str | None = None,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        tls: TlsConfig | None = None,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._core = ClientCore(
            target,
            model=model,
            timeout_s=timeout_s,
            retry=retry or RetryPolicy(),
            tls=tls,
            token=token,
            max_message_bytes=max_message_bytes,
        )
        self._channel, self._methods = self._core.open_channel(grpc)
        self._model_infos: dict[str, ModelInfo] = {}
        self._lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- API -----------------------------------------------------------------------------------

    @overload
    def classify(
        self,
        images: ImageInput,
        *,
        top_k: int = ...,
        model: str | None = ...,
        version: str | int | None = ...,
        timeout_s: float | None = ...,
    ) -> Classification: ...

    @overload
    def classify(
        self,
        images: Iterable[ImageInput],
        *,
        top_k: int = ...,
        model: str | None = ...,
        version: str | int | None = ...,
        timeout_s: float | None = ...,
    ) -> list[Classification]: ...

    def classify(
        self,
        images: ImageInput | Iterable[ImageInput],
        *,
        top_k: int = DEFAULT_TOP_K,
        model: str | None = None,
        version: str | int | None = None,
        timeout_s: float | None = None,
    ) -> Classification | list[Classification]:
        """Top-k classes of one image (returns one result) or of many (returns a list, same order).

        Many images go in one request, so the server batches them together; if any of them is
        bad the whole call fails with INVALID_ARGUMENT. Use `classify_stream` to get per-image
        errors instead. `version` picks a model version (default: the newest the server serves).
        """
        results = self._unary(self._core.classify_call(as_list(images), top_k, model, version), timeout_s)
        return results[0] if is_single(images) else results

    def classify_stream(
        self,
        images: Iterable[ImageInput],
        *,
        top_k: int = DEFAULT_TOP_K,
        model: str | None = None,
        version: str | int | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        timeout_s: float | None = None,
    ) -> Iterator[StreamResult]:
        """Classify an iterable of images over one streaming call, results in input order.

        At most `max_in_flight` images are at the server at once (the server batches them); the
        iterable is read lazily, so it can be endless. A bad image yields a `StreamResult` with
        `error` set and the stream goes on; a failure of the stream itself raises `ClientError`.
        Streams are not retried; `timeout_s` (default: none) bounds the whole stream.
        """
        self._core.check_stream_args(top_k, max_in_flight, version)
        order = StreamOrder()
        slots = threading.Semaphore(max_in_flight)
        stopped = threading.Event()

        failure: list[Exception] = []  # raised by the caller's iterable or a wrong image type

        def requests() -> Iterator[Any]:
            # Runs on a gRPC thread: exceptions are carried back to the caller, not raised here.
            try:
                for image in images:
                    while not slots.acquire(timeout=0.1):
                        if stopped.is_set():
                            return
                    index = order.register()
                    try:
                        request = self._core.stream_request(index, image, top_k, model, version)
                    except ClientError as exc:
                        order.fail_locally(index, exc)
                        slots.release()
                        continue
                    yield request
            except Exception as exc:
                failure.append(exc)

        call = self._methods[CLASSIFY_STREAM.path](
            requests(), timeout=timeout_s, metadata=self._core.metadata
        )
        try:
            for response in call:
                order.receive(response)
                slots.release()
                yield from order.ready()
            if failure:
                raise failure[0]
            yield from order.finish()
        except grpc.RpcError as exc:
            raise ClientError.from_rpc_error(exc) from None
        finally:
            stopped.set()
            call.cancel()

    def infer(
        self, tensor: np.ndarray, *, model: str | None = None, timeout_s: float | None = None
    ) -> InferResult:
        """Run the model on a preprocessed FP32/FP16 NCHW batch through KServe ModelInfer.

        The tensor travels as raw little-endian bytes; the result holds the raw outputs (logits).
        The model's name and input come from its metadata, fetched once per model.
        """
        return self._unary(self._core.infer_call(tensor, self._model_info(model, timeout_s)), timeout_s)

    def model_metadata(self, *, model: str | None = None, timeout_s: float | None = None) -> ModelInfo:
        return self._unary(self._core.model_metadata_call(model), timeout_s)

    def server_ready(self, *, timeout_s: float | None = None) -> bool:
        return self._unary(self._core.server_ready_call(), timeout_s)

    def serving_status(self, *, service: str = "", timeout_s: float | None = None) -> str:
        """The gRPC health service's status of `service` ("": the server; or a model name).

        What Kubernetes' gRPC probes and `hrnet health` ask: "SERVING" once every model has
        loaded, "NOT_SERVING" while loading or draining.
        """
        return self._unary(self._core.health_check_call(service), timeout_s)

    def health(self, *, model: str | None = None, timeout_s: float | None = None) -> Health:
        """Liveness, readiness and the model's readiness in one answer."""
        return Health(
            live=self._unary(self._core.server_live_call(), timeout_s),
            ready=self._unary(self._core.server_ready_call(), timeout_s),
            model_ready=self._unary(self._core.model_ready_call(model), timeout_s),
        )

    # --- plumbing ------------------------------------------------------------------------------

    def _model_info(self, model: str | None, timeout_s: float | None) -> ModelInfo:
        key = self._core.model_name(model)
        with self._lock:
            info = self._model_infos.get(key)
        if info is None:
            info = self.model_metadata(model=model, timeout_s=timeout_s)
            with self._lock:
                self._model_infos[key] = info
        return info

    def _unary(self, call: UnaryCall[T], timeout_s: float | None) -> T:
        deadline = self._core.deadline(timeout_s)
        method = self._methods[call.rpc.path]
        attempt = 0
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                response = method(call.request, timeout=deadline.remaining_s(), metadata=self._core.metadata)
            except grpc.RpcError as exc:
                error = ClientError.from_rpc_error(exc)
                wait_s = self._core.retry_wait_s(call, attempt, error, deadline)
                if wait_s is None:
                    raise error from None
                time.sleep(wait_s)
                continue
            return call.parse(response, time.perf_counter() - started)
