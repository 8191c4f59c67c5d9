"""How the client connects: transport security, call metadata and channel options.

Shared by the blocking and the asyncio client so both connect identically.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from clients.errors import ClientError

log = logging.getLogger(__name__)

# The server's default limit (serving config `max_message_bytes`). gRPC's own default of 4 MiB
# overflows at seven 224x224 FP32 images; 64 MiB holds a batch of about a hundred.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

PemSource = str | os.PathLike | bytes


@dataclass(frozen=True)
class TlsConfig:
    """TLS settings; all fields optional.

    `ca`: PEM (bytes) or a path to it that signs the server's certificate; None uses the system
    roots. `cert` + `key`: this client's certificate and key, for servers that require mutual TLS.
    `server_name`: the name to verify the server certificate against when it differs from the host
    in the target (e.g. connecting by IP to a certificate issued for a DNS name).
    """

    ca: PemSource | None = None
    cert: PemSource | None = None
    key: PemSource | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("mutual TLS needs both a client certificate and its key (cert= and key=)")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.ca, "CA certificate"),
            private_key=_read_pem(self.key, "client key"),
            certificate_chain=_read_pem(self.cert, "client certificate"),
        )


def _read_pem(source: PemSource | None, what: str) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise ClientError(
            grpc.StatusCode.INVALID_ARGUMENT, f"cannot read the {what} {str(source)!r}: {exc}"
        ) from exc


def channel_options(
    tls: TlsConfig | None, max_message_bytes: int, max_reconnect_backoff_s: float
) -> list[tuple[str, int | str]]:
    options: list[tuple[str, int | str]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # gRPC's own reconnect backoff grows to two minutes, during which every call fails at once
        # with UNAVAILABLE; capping it at the retry policy's longest wait lets a retried call find a
        # restarted server.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", max(100, int(max_reconnect_backoff_s * 1000))),
    ]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def warn_if_cleartext_token(token: str | None, tls: TlsConfig | None, target: str) -> None:
    if token and tls is None and not target.startswith(("127.", "localhost", "[::1]", "unix:")):
        log.warning("sending an auth token to %s without TLS: anyone on the path can read it", target)
