"""The one exception every client call raises, whatever went wrong on the wire or on the server."""

from __future__ import annotations

import os
from pathlib import Path

import grpc

_CODES_BY_VALUE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


class ClientError(Exception):
    """A failed call: the gRPC status code and the server's message, verbatim.

    Callers branch on `code` (e.g. retry later on RESOURCE_EXHAUSTED, fix the input on
    INVALID_ARGUMENT) instead of parsing text. Images that cannot be read locally are reported the
    same way, with INVALID_ARGUMENT, so one `except ClientError` covers a whole batch job.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ClientError:
        # Both grpc.Call errors (sync) and grpc.aio.AioRpcError provide code() and details().
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")

    @classmethod
    def from_code_value(cls, value: int, message: str) -> ClientError:
        """For statuses carried inside a message body (a failed item of ClassifyStream)."""
        return cls(_CODES_BY_VALUE.get(value, grpc.StatusCode.UNKNOWN), message)


def read_local_file(path: str | os.PathLike, what: str) -> bytes:
    """A local file the caller named (an image, a certificate): unreadable is INVALID_ARGUMENT."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ClientError(
            grpc.StatusCode.INVALID_ARGUMENT, f"cannot read {what} {str(path)!r}: {exc}"
        ) from exc
