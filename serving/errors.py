"""One error hierarchy for the whole server.

Each class names the gRPC status it stands for (as the `grpc.StatusCode` member name, so this
module and the batcher stay free of gRPC) and builds its own message. `describe` is where any
exception becomes a (code, message) pair; gRPC maps it to a status (`serving.api.rpc`), HTTP to a
status code and `{"error": ...}` body (`serving.api.http`). Anything unexpected is INTERNAL.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# A status message travels in trailing metadata, which clients cap (gRPC: 8 KiB soft, 16 KiB hard):
# a longer one reaches the caller as RESOURCE_EXHAUSTED instead of what actually went wrong.
MAX_MESSAGE_CHARS = 1000
QUOTE_CHARS = 80  # of one value the caller sent, quoted back in an error


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """`repr(value)`, cut to `limit` characters: errors quote what the caller sent, boundedly."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def clip(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return message if len(message) <= limit else f"{message[:limit]}... ({len(message)} characters)"


class ServingError(Exception):
    """Base of every error the server reports to a caller."""

    code = "INTERNAL"


class InvalidArgument(ServingError):
    """The request itself is wrong: shape, datatype, size, parameter or image."""

    code = "INVALID_ARGUMENT"


class ModelNotFound(ServingError):
    code = "NOT_FOUND"

    def __init__(self, name: str, version: str = "", known: list[str] | None = None, reason: str = ""):
        what = f"model {quote(name)}" + (f" version {quote(version)}" if version else "")
        why = f" ({reason})" if reason else ""
        hint = f"; available: {', '.join(known)}" if known else ""
        super().__init__(f"{what} is not served here{why}{hint}")


class NotFound(ServingError):
    """Something the request names (other than a model) does not exist, e.g. a shared-memory region."""

    code = "NOT_FOUND"


class AlreadyExists(ServingError):
    code = "ALREADY_EXISTS"


class ResourceExhausted(ServingError):
    """Back-pressure: fail at once rather than block; the client may retry later."""

    code = "RESOURCE_EXHAUSTED"


class QueueFull(ResourceExhausted):
    """The batching queue holds `max_queue_size` images."""

    def __init__(self, queued: int, requested: int, capacity: int):
        super().__init__(
            f"queue full: {queued} image(s) queued + {requested} requested > max_queue_size {capacity}; "
            "retry later or add instances"
        )


class DeadlineExceeded(ServingError):
    """The request's deadline or `timeout` passed while it was queued; it was never computed."""

    code = "DEADLINE_EXCEEDED"

    def __init__(self, waited_s: float):
        super().__init__(f"deadline exceeded after {waited_s * 1e3:.1f} ms in the queue; not computed")


class Unavailable(ServingError):
    """The server is shutting down and accepts no new work."""

    code = "UNAVAILABLE"


class Unauthenticated(ServingError):
    """The call carries no valid credentials."""

    code = "UNAUTHENTICATED"


class Unimplemented(ServingError):
    """The server does not offer this (a setting may enable it)."""

    code = "UNIMPLEMENTED"


class FailedPrecondition(ServingError):
    """The request is valid, but the server's configuration does not allow it."""

    code = "FAILED_PRECONDITION"


class Relayed(ServingError):
    """An error another process of this server reported, with its status code (front ends)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ExecutionTimeout(Unavailable):
    """A batch computed past `execution_timeout_s`: its instance is presumed hung and is replaced.

    UNAVAILABLE because the condition is transient: a retry lands on another or the new instance.
    """

    def __init__(self, limit_s: float):
        super().__init__(
            f"the model instance computing this request did not finish within execution_timeout_s "
            f"{limit_s:g} s; it is being replaced by a fresh one, retry"
        )


class InferenceFailed(ServingError):
    """The backend raised while computing a batch."""

    code = "INTERNAL"


class StartError(FailedPrecondition):
    """The server cannot start as configured; `hrnet serve` prints the message and exits 2."""


class ListenError(StartError):
    """A port cannot be bound (in use, or not permitted)."""


class TlsFileError(StartError):
    """A configured TLS certificate, key or CA file cannot be read."""


class ModelLoadError(StartError):
    """A model in the repository is missing, corrupt or misconfigured."""


def describe(exc: BaseException) -> tuple[str, str]:
    """The status code name and message a caller gets for `exc`; unexpected errors are logged."""
    if isinstance(exc, ServingError):
        return exc.code, clip(str(exc))
    log.error("unexpected error", exc_info=exc)
    return "INTERNAL", clip(f"internal error: {type(exc).__name__}: {exc}")
