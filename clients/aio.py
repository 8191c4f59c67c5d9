"""The asyncio client: the same methods as `Client`, awaitable, on a grpc.aio channel.

Many concurrent `classify` calls from one event loop are the cheapest way to keep the server's
batches full. Requests, responses and retry decisions come from `clients.core`, shared with the
blocking client; only the waiting differs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import Any, TypeVar, overload

import grpc
import grpc.aio
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


class AsyncClient:
    """`Client` for asyncio code.

    >>> async with AsyncClient("127.0.0.1:8001") as client:
    ...     results = await asyncio.gather(*(client.classify(p) for p in paths))

    The channel is opened on first use inside the running event loop (grpc.aio channels belong
    to one loop); use the client from that loop only.
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
        self._channel: grpc.aio.Channel | None = None
        self._methods: dict[str, Any] = {}
        self._model_infos: dict[str, ModelInfo] = {}

    # --- lifecycle ---------------------------------------------------------------------------

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._methods = {}

    async def __aenter__(self) -> AsyncClient:
        self._method(CLASSIFY_STREAM.path)  # open the channel now, inside the loop
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    def _method(self, path: str) -> Any:
        if self._channel is None:
            self._channel, self._methods = self._core.open_channel(grpc.aio)
        return self._methods[path]

    # --- API (see Client for the contracts) ------------------------------------------------------

    @overload
    async def classify(
        self,
        images: ImageInput,
        *,
        top_k: int = ...,
        model: str | None = ...,
        version: str | int | None = ...,
        timeout_s: float | None = ...,
    ) -> Classification: ...

    @overload
    async def classify(
        self,
        images: Iterable[ImageInput],
        *,
        top_k: int = ...,
        model: str | None = ...,
        version: str | int | None = ...,
        timeout_s: float | None = ...,
    ) -> list[Classification]: ...

    async def classify(
        self,
        images: ImageInput | Iterable[ImageInput],
        *,
        top_k: int = DEFAULT_TOP_K,
        model: str | None = None,
        version: str | int | None = None,
        timeout_s: float | None = None,
    ) -> Classification | list[Classification]:
        call = self._core.classify_call(as_list(images), top_k, model, version)
        results = await self._unary(call, timeout_s)
        return results[0] if is_single(images) else results

    async def classify_stream(
        self,
        images: Iterable[ImageInput] | AsyncIterable[ImageInput],
        *,
        top_k: int = DEFAULT_TOP_K,
        model: str | None = None,
        version: str | int | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        timeout_s: float | None = None,
    ) -> AsyncIterator[StreamResult]:
        self._core.check_stream_args(top_k, max_in_flight, version)
        order = StreamOrder()
        slots = asyncio.Semaphore(max_in_flight)
        failure: list[Exception] = []  # raised by the caller's iterable or a wrong image type
        # grpc.aio loses the server's status (UNAUTHENTICATED, NOT_FOUND...) to "INTERNAL: Internal
        # error from Core" when a write races the server ending the call; so nothing more is sent
        # until the first answer shows the server accepted the stream. It costs one round trip.
        accepted = asyncio.Event()

        async def requests() -> AsyncIterator[Any]:
            try:
                async for image in _aiter(images):
                    await slots.acquire()
                    index = order.register()
                    try:
                        request = self._core.stream_request(index, image, top_k, model, version)
                    except ClientError as exc:
                        order.fail_locally(index, exc)
                        slots.release()
                        continue
                    yield request
                    await accepted.wait()
            except Exception as exc:
                failure.append(exc)

        call = self._method(CLASSIFY_STREAM.path)(requests(), timeout=timeout_s, metadata=self._core.metadata)
        try:
            async for response in call:
                accepted.set()
                order.receive(response)
                slots.release()
                for result in order.ready():
                    yield result
            if failure:
                raise failure[0]
            for result in order.finish():
                yield result
        except grpc.RpcError as exc:
            raise ClientError.from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def infer(
        self, tensor: np.ndarray, *, model: str | None = None, timeout_s: float | None = None
    ) -> InferResult:
        key = self._core.model_name(model)
        if key not in self._model_infos:
            self._model_infos[key] = await self.model_metadata(model=model, timeout_s=timeout_s)
        return await self._unary(self._core.infer_call(tensor, self._model_infos[key]), timeout_s)

    async def model_metadata(self, *, model: str | None = None, timeout_s: float | None = None) -> ModelInfo:
        return await self._unary(self._core.model_metadata_call(model), timeout_s)

    async def server_ready(self, *, timeout_s: float | None = None) -> bool:
        return await self._unary(self._core.server_ready_call(), timeout_s)

    async def serving_status(self, *, service: str = "", timeout_s: float | None = None) -> str:
        return await self._unary(self._core.health_check_call(service), timeout_s)

    async def health(self, *, model: str | None = None, timeout_s: float | None = None) -> Health:
        return Health(
            live=await self._unary(self._core.server_live_call(), timeout_s),
            ready=await self._unary(self._core.server_ready_call(), timeout_s),
            model_ready=await self._unary(self._core.model_ready_call(model), timeout_s),
        )

    # --- plumbing ------------------------------------------------------------------------------

    async def _unary(self, call: UnaryCall[T], timeout_s: float | None) -> T:
        deadline = self._core.deadline(timeout_s)
        method = self._method(call.rpc.path)
        attempt = 0
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                response = await method(
                    call.request, timeout=deadline.remaining_s(), metadata=self._core.metadata
                )
            except grpc.RpcError as exc:
                error = ClientError.from_rpc_error(exc)
                wait_s = self._core.retry_wait_s(call, attempt, error, deadline)
                if wait_s is None:
                    raise error from None
                await asyncio.sleep(wait_s)
                continue
            return call.parse(response, time.perf_counter() - started)


async def _aiter(items: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
