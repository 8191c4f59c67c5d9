"""How the client connects: which replicas, transport security, call metadata and channel options.

Shared by the blocking and the asyncio client so both connect identically.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from clients.errors import read_local_file

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
    return read_local_file(source, f"the {what}")


# Targets starting with a gRPC name-resolver scheme go to gRPC exactly as written.
GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")

# Several replicas: calls go round robin over every connected one, and gRPC itself watches each
# replica's health service (`grpc.health.v1`, service "") and sends no new call to one that is not
# SERVING (still loading, or draining after SIGTERM) until it is again.
SPREAD_SERVICE_CONFIG = json.dumps(
    {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}}
)


@dataclass(frozen=True)
class Target:
    """Where the channel connects.

    `uri` is what gRPC is given. `spread` is true when several replicas may answer: a list of
    addresses, or a `dns:` URI (every address the name resolves to, re-resolved as replicas
    come and go). `authority` is the name a list of resolved IPs is reached under (the first
    address given), so TLS checks the certificate against it.
    """

    uri: str
    addresses: tuple[str, ...]  # as given, for messages and the cleartext-token check
    spread: bool
    authority: str | None = None


def parse_target(target: str | Sequence[str]) -> Target:
    """`HOST:PORT`, several of them (a list, or one string separated by commas), or a gRPC URI.

    gRPC resolves a list only when it is made of IP literals (`ipv4:a,b`), so host names in a
    list are resolved here, once; for a set of replicas that changes, give one DNS name
    (`dns:///NAME:PORT`, e.g. a Kubernetes headless Service) that gRPC re-resolves itself.
    """
    if isinstance(target, str) and target.startswith(GRPC_SCHEMES):
        return Target(target, (target,), spread=target.startswith("dns:") or "," in target)
    given = target.split(",") if isinstance(target, str) else list(target)
    addresses = tuple(a.strip() for a in given)
    if not addresses or not all(addresses):
        raise ValueError(f"target must be HOST:PORT, several of them or a gRPC URI; got {target!r}")
    if len(addresses) == 1:
        return Target(addresses[0], addresses, spread=False)
    return Target(_ip_list(addresses), addresses, spread=True, authority=addresses[0])


def _ip_list(addresses: Sequence[str]) -> str:
    """`ipv4:IP:PORT,...` (or `ipv6:`) for every address each HOST:PORT resolves to, in order."""
    resolved = {family: [] for family in (socket.AF_INET, socket.AF_INET6)}
    missing = {family: [] for family in resolved}
    for address in addresses:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"{address!r} is not HOST:PORT")
        try:
            infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ValueError(f"cannot resolve {address!r}: {exc}") from None
        for family, items in resolved.items():
            found = [f"[{i[4][0]}]:{port}" if family == socket.AF_INET6 else f"{i[4][0]}:{port}"
                     for i in infos if i[0] == family]  # fmt: skip
            items.extend(f for f in found if f not in items)
            if not found:
                missing[family].append(address)
    for family, scheme in ((socket.AF_INET, "ipv4"), (socket.AF_INET6, "ipv6")):
        if not missing[family]:
            return f"{scheme}:{','.join(resolved[family])}"
    raise ValueError(
        f"{', '.join(missing[socket.AF_INET])} have no IPv4 and {', '.join(missing[socket.AF_INET6])} "
        "no IPv6 address: one channel needs one address family"
    )


def channel_options(
    tls: TlsConfig | None, max_message_bytes: int, max_reconnect_backoff_s: float, target: Target
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
    if target.spread:
        options.append(("grpc.service_config", SPREAD_SERVICE_CONFIG))
    if target.authority:
        options.append(("grpc.default_authority", target.authority))
    return options


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def warn_if_cleartext_token(token: str | None, tls: TlsConfig | None, target: Target) -> None:
    local = ("127.", "localhost", "[::1]", "unix:")
    if token and tls is None and not all(a.startswith(local) for a in target.addresses):
        log.warning(
            "sending an auth token to %s without TLS: anyone on the path can read it",
            ",".join(target.addresses),
        )
