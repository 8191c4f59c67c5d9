"""HTTP on the server's own event loop (aiohttp): listeners, and errors as HTTP statuses.

The REST API (`serving.api.rest`) and the metrics port (`serving.metrics`) run here, beside gRPC on
the same loop, so they read the data plane directly and a wedged loop fails their probes too.
This is the one place an error becomes an HTTP status: the gRPC code the error stands for
(`serving.errors.describe`) mapped as KServe and Triton do, with a `{"error": "..."}` body.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web

from serving.errors import ListenError, describe

HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,  # the client closed the request (nginx's code); it never reads the answer
    "INTERNAL": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure answers `{"error": "..."}`: ours by their code, aiohttp's own (unknown path,
    wrong method, body too large) with their status, anything else 500 (and logged)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, f"{exc.reason}: {request.method} {request.path}")
    except Exception as exc:
        code, message = describe(exc)
        return error_response(HTTP_STATUS.get(code, 500), message)


class HttpListener:
    """One aiohttp application on host:port, started and stopped with the server."""

    def __init__(self, app: web.Application, what: str, shutdown_timeout_s: float) -> None:
        # No access log: gRPC logs no line per call either, and at thousands of requests a second
        # the log would cost more than the request. A client that hangs up cancels its handler,
        # so its request leaves the batching queue as a cancelled gRPC call does.
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=shutdown_timeout_s
        )
        self._what = what

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen; the bound port (useful with 0). ListenError when it cannot be bound."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context, reuse_port=False)
        try:
            await site.start()
        except OSError as exc:  # the owner still calls stop(), which releases what setup() made
            raise ListenError(
                f"cannot listen on {host}:{port} for {self._what} ({exc.strerror or exc}); "
                "is another server running?"
            ) from None
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop listening; requests being answered get `shutdown_timeout_s` to finish."""
        await self._runner.cleanup()
