"""Who may call the server: a bearer token checked on every call, and TLS / mutual TLS.

The token travels as call metadata `authorization: Bearer <token>` (what `clients.Client(token=)`
and `hrnet classify --token` send), over HTTP as the `Authorization` header. Health and liveness
checks are exempt, so load balancers and orchestrators can probe the server without holding the
secret. The REST port is held to the same token and the same certificates as the gRPC port.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ssl
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from serving.errors import TlsFileError, Unauthenticated

# Probes that must work without credentials (Kubernetes, load balancers, `grpc_health_probe`).
EXEMPT_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
    }
)
# The same two questions over REST.
EXEMPT_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
FIRST_MESSAGE_WAIT_S = 5.0
DENIED = "missing or wrong auth token: send the metadata 'authorization: Bearer <token>'"
DENIED_HTTP = "missing or wrong auth token: send the header 'Authorization: Bearer <token>'"


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every non-exempt call whose `authorization` metadata is not `Bearer <token>`."""

    def __init__(self, token: str, exempt: frozenset[str] = EXEMPT_METHODS) -> None:
        if not token:
            raise ValueError("an empty auth token would let everyone in")
        self._expected = f"Bearer {token}".encode()
        self._exempt = exempt

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method in self._exempt or self._authorized(details):
            return handler
        return _denying(handler)

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)  # constant time: no timing oracle
        return False


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that fails with UNAUTHENTICATED before any work."""

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        if handler.request_streaming:
            # Take the first message before answering: ending the call while the client is still
            # writing it makes grpc.aio clients report INTERNAL instead of UNAUTHENTICATED.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(anext(aiter(request), None), FIRST_MESSAGE_WAIT_S)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)

    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **codecs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **codecs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **codecs)
    return grpc.unary_unary_rpc_method_handler(deny, **codecs)


def interceptors(token: str) -> Sequence[grpc.aio.ServerInterceptor]:
    return [TokenInterceptor(token)] if token else []


def bind(server: grpc.aio.Server, address: str, cert: str, key: str, client_ca: str) -> int:
    """Listen on `address` with TLS when a certificate is configured, else in plaintext; the port."""
    if not cert:
        return server.add_insecure_port(address)
    try:
        chain, private_key = Path(cert).read_bytes(), Path(key).read_bytes()
        client_roots = Path(client_ca).read_bytes() if client_ca else None
    except OSError as exc:
        raise TlsFileError(f"cannot read a TLS file: {exc}") from None
    credentials = grpc.ssl_server_credentials(
        [(private_key, chain)], root_certificates=client_roots, require_client_auth=bool(client_ca)
    )
    return server.add_secure_port(address, credentials)


def http_middlewares(token: str) -> list[Any]:
    """aiohttp middleware refusing every non-exempt request without `Authorization: Bearer <token>`."""
    if not token:
        return []
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check_token(request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
        given = request.headers.get("Authorization", "").encode()
        if request.path not in EXEMPT_PATHS and not hmac.compare_digest(given, expected):
            raise Unauthenticated(DENIED_HTTP)
        return await handler(request)

    return [check_token]


def ssl_context(cert: str, key: str, client_ca: str) -> ssl.SSLContext | None:
    """The HTTP side of `bind`: None for plaintext, else TLS with the same files (and mutual TLS)."""
    if not cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
        if client_ca:
            context.load_verify_locations(client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise TlsFileError(f"cannot read a TLS file: {exc}") from None
    return context
