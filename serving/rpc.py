"""The one place domain errors become gRPC statuses, and gRPC deadlines become queue deadlines."""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from serving.errors import describe

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


async def concurrently(
    requests: AsyncIterator[Req], handle: Callable[[Req], Awaitable[Resp]]
) -> AsyncIterator[Resp]:
    """Serve a bidirectional stream: each request handled as it arrives, responses as they finish.

    Running a stream's requests concurrently lets one streaming client fill batches by itself.
    `handle` turns its own failures into error responses; the stream ends when the client's
    side is done and every response is out, and cancels what is pending if the call dies.
    """
    responses: asyncio.Queue[Resp | None] = asyncio.Queue()
    pending: set[asyncio.Task[None]] = set()

    async def one(request: Req) -> None:
        await responses.put(await handle(request))

    async def read() -> None:
        async for request in requests:
            task = asyncio.create_task(one(request))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(set(pending))
        await responses.put(None)

    reader = asyncio.create_task(read())
    try:
        while (response := await responses.get()) is not None:
            yield response
        await reader
    finally:
        reader.cancel()
        for task in list(pending):
            task.cancel()
