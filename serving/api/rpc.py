"""The one place errors become gRPC statuses, and gRPC deadlines become queue deadlines.

Also the guard every call passes first (`CallGuard`): a request that does not parse is answered
INVALID_ARGUMENT in one log line (gRPC itself would answer UNKNOWN quoting Python's exception
and log a traceback per call), and the calls in progress are counted so a stopping server knows
when the last answer has been handed over.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc

from serving.api.codec import parse_infer_request
from serving.errors import InvalidArgument, describe

log = logging.getLogger(__name__)
# Requests parsed with their large buffers left where gRPC delivered them (serving.api.codec).
IN_PLACE: dict[str, Callable[[bytes], Any]] = {
    "/inference.GRPCInferenceService/ModelInfer": parse_infer_request,
    "/inference.GRPCInferenceService/ModelStreamInfer": parse_infer_request,
}

FLUSH_S = 0.5  # after the last answer was handed to gRPC: time for it to leave through the socket
Req = TypeVar("Req")
Resp = TypeVar("Resp")


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    code, message = describe(exc)
    return grpc.StatusCode[code], message


def grpc_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a servicer method (coroutine or async generator): ServingError -> its status code."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for item in method(self, request, context):
                    yield item
            except Exception as exc:
                await context.abort(*status_of(exc))

        return stream

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except Exception as exc:
            await context.abort(*status_of(exc))

    return unary


def remaining_s(context: grpc.aio.ServicerContext, timeout_s: float | None) -> float | None:
    """The tighter of the client's gRPC deadline and the request's own timeout, in seconds."""
    grpc_left = context.time_remaining()
    candidates = [t for t in (grpc_left, timeout_s) if t is not None]
    return min(candidates) if candidates else None


@dataclass(frozen=True)
class _End:
    """The last item of a stream's response queue: the request side is done, maybe with an error."""

    error: Exception | None


async def concurrently(
    requests: AsyncIterator[Req],
    handle: Callable[[Req], Awaitable[Resp]],
    error_response: Callable[[Req, grpc.StatusCode, str], Resp],
) -> AsyncIterator[Resp]:
    """Serve a bidirectional stream: each request handled as it arrives, responses as they finish.

    Running a stream's requests concurrently lets one streaming client fill batches by itself.
    A request that fails becomes `error_response(request, code, message)` in the stream (each
    protocol says errors its own way) and the stream goes on. The stream ends when the client's side
    is done and every response is out; when reading the client's side fails (a malformed message),
    the requests already accepted are answered first, then the error ends the call. What is
    pending is cancelled if the call dies.
    """
    responses: asyncio.Queue[Resp | _End] = asyncio.Queue()
    pending: set[asyncio.Task[None]] = set()

    async def one(request: Req) -> None:
        try:
            response = await handle(request)
        except Exception as exc:
            response = error_response(request, *status_of(exc))
        await responses.put(response)

    async def read() -> None:
        error: Exception | None = None
        try:
            async for request in requests:
                task = asyncio.create_task(one(request))
                pending.add(task)
                task.add_done_callback(pending.discard)
        except Exception as exc:
            error = exc
        if pending:
            await asyncio.wait(set(pending))
        await responses.put(_End(error))

    reader = asyncio.create_task(read())
    try:
        while not isinstance(item := await responses.get(), _End):
            yield item
        if item.error is not None:
            raise item.error
    finally:
        reader.cancel()
        for task in list(pending):
            task.cancel()


class MalformedRequest(InvalidArgument):
    """A request message that does not parse as the method's protobuf type."""


@dataclass(frozen=True)
class _Unparsed:
    """What the guarded deserializer returns instead of raising: gRPC would answer UNKNOWN."""

    method: str
    size: int

    def error(self) -> MalformedRequest:
        return MalformedRequest(
            f"malformed request: {self.size} bytes that do not parse as the request message of {self.method}"
        )


class CallGuard(grpc.aio.ServerInterceptor):
    """First on every call: malformed messages become INVALID_ARGUMENT; unary calls are counted.

    Counting lets a stopping server wait until the last unary answer has been handed to gRPC
    (streams are left to the drain: a client may hold one open for as long as it likes).
    """

    def __init__(self) -> None:
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        cached = self._guarded.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = self._guard(handler, details.method)
        if guarded is not handler:
            self._guarded[details.method] = (handler, guarded)
        return guarded

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no unary call is in progress; False if some still are after `timeout_s`."""
        try:
            await asyncio.wait_for(self._idle.wait(), max(timeout_s, 0.0))
        except TimeoutError:
            return False
        return True

    def _guard(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        deserialize = IN_PLACE.get(method, handler.request_deserializer)

        def parse(data: bytes) -> Any:
            try:
                return deserialize(data)
            except Exception:
                log.warning("malformed request", extra={"method": method, "bytes": len(data)})
                return _Unparsed(method, len(data))

        codecs = {"request_deserializer": parse, "response_serializer": handler.response_serializer}
        if handler.request_streaming:
            behaviour = handler.stream_stream or handler.stream_unary
            wrapped = _streaming(behaviour)
            if wrapped is None:
                return handler
            if handler.response_streaming:
                return grpc.stream_stream_rpc_method_handler(wrapped, **codecs)
            return grpc.stream_unary_rpc_method_handler(wrapped, **codecs)
        if handler.response_streaming:
            wrapped = _unary(handler.unary_stream)
            return handler if wrapped is None else grpc.unary_stream_rpc_method_handler(wrapped, **codecs)
        wrapped = _unary(self._counted(handler.unary_unary))
        return handler if wrapped is None else grpc.unary_unary_rpc_method_handler(wrapped, **codecs)

    def _counted(self, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        if not inspect.iscoroutinefunction(behaviour):
            return behaviour

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self.active += 1
            self._idle.clear()
            try:
                return await behaviour(request, context)
            finally:
                self.active -= 1
                if not self.active:
                    self._idle.set()

        return call


def _unary(behaviour: Callable[..., Any]) -> Callable[..., Any] | None:
    """`behaviour` answering INVALID_ARGUMENT to an unparsed request (None: not an async handler)."""
    if inspect.isasyncgenfunction(behaviour):

        async def generate(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Unparsed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error()))
            async for item in behaviour(request, context):
                yield item

        return generate
    if not inspect.iscoroutinefunction(behaviour):
        return None

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Unparsed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error()))
        return await behaviour(request, context)

    return call


def _streaming(behaviour: Callable[..., Any]) -> Callable[..., Any] | None:
    """`behaviour` reading a request stream that raises MalformedRequest at an unparsed message."""

    async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, _Unparsed):
                raise request.error()
            yield request

    if inspect.isasyncgenfunction(behaviour):

        async def generate(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            try:
                async for item in behaviour(checked(requests), context):
                    yield item
            except MalformedRequest as exc:  # a handler that does not map errors itself
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

        return generate
    if not inspect.iscoroutinefunction(behaviour):
        return None

    async def call(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behaviour(checked(requests), context)
        except MalformedRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    return call


def exit_now(code: int) -> NoReturn:
    """End the process without shutting gRPC down, once every accepted call has been answered.

    gRPC's own shutdown cancels the calls that reach it while it runs, and their callers see
    CANCELLED, which most clients (Triton's among them) do not retry. Closing the sockets with the
    process shows such callers UNAVAILABLE instead, which every client treats as "try again".
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
