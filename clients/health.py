"""`hrnet health`: is the server SERVING? Exit 0 if so, 1 with one line saying why not.

A container's HEALTHCHECK runs it (no curl: the server speaks gRPC), so it needs only the client
install. It asks the standard gRPC health service, the same question Kubernetes' gRPC probes ask,
and never retries: the caller (Docker, a script) decides how often to ask again. Every unhealthy
answer exits 1, unreachable and timed out included, because Docker reserves exit status 2;
only bad flags exit 2, as everywhere else.
"""

from __future__ import annotations

import argparse
import os

from clients.client import Client
from clients.errors import ClientError
from clients.options import add_security_arguments, tls_config, token
from clients.retry import RetryPolicy
from core.errors import CommandError

PORT_ENV = "HRNET_PORT"  # the server's own port setting: in its container, the check follows it


class Unhealthy(CommandError):
    exit_code = 1


def default_server() -> str:
    return f"127.0.0.1:{os.environ.get(PORT_ENV) or 8001}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server", default=None, metavar="HOST:PORT", help=f"default: 127.0.0.1:${PORT_ENV}, else 8001"
    )
    parser.add_argument(
        "--service", default="", help="a model name, or a gRPC service (default: the whole server)"
    )
    parser.add_argument("--timeout", type=float, default=5.0, metavar="S", help="default: %(default)s")
    add_security_arguments(parser)


def run(args: argparse.Namespace) -> int:
    server = args.server or default_server()
    if "," in server or args.timeout <= 0:
        raise CommandError(f"--server takes one HOST:PORT and --timeout a positive number; got {server}")
    what = f"{server} ({args.service})" if args.service else server
    try:
        with Client(
            server, timeout_s=args.timeout, retry=RetryPolicy.off(), tls=tls_config(args), token=token(args)
        ) as client:
            status = client.serving_status(service=args.service)
    except ClientError as exc:
        detail = " ".join(exc.message.split())  # one line, whatever gRPC put in it
        raise Unhealthy(f"{what}: {exc.code.name}: {detail}") from None
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if status != "SERVING":
        raise Unhealthy(f"{what} is {status} (loading models or draining)")
    print(f"{what}: SERVING")
    return 0
