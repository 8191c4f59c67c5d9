"""How `hrnet classify` and `hrnet health` reach a server: the security flags and the token.

One definition, so both commands take the same flags and read them the same way.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from clients.channel import TlsConfig
from core.errors import CommandError

TOKEN_ENV = "HRNET_AUTH_TOKEN"  # the variable the server reads its token from


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    security = parser.add_argument_group("security")
    security.add_argument(
        "--tls", action="store_true", help="connect with TLS (implied by --ca/--cert/--key)"
    )
    security.add_argument(
        "--ca", type=Path, help="PEM file of the CA that signed the server (default: system)"
    )
    security.add_argument("--cert", type=Path, help="client certificate PEM, for mutual TLS")
    security.add_argument("--key", type=Path, help="client private key PEM, for mutual TLS")
    security.add_argument("--server-name", help="name to check the server certificate against")
    security.add_argument(
        "--token", help=f"auth token sent as 'authorization: Bearer' (default: ${TOKEN_ENV})"
    )


def tls_config(args: argparse.Namespace) -> TlsConfig | None:
    if not (args.tls or args.ca or args.cert or args.key):
        return None
    if (args.cert is None) != (args.key is None):
        raise CommandError("mutual TLS needs both --cert and --key")
    return TlsConfig(ca=args.ca, cert=args.cert, key=args.key, server_name=args.server_name)


def token(args: argparse.Namespace) -> str | None:
    return args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
