"""One error hierarchy for the whole server.

Each class names the gRPC status it stands for (as the `grpc.StatusCode` member name, so this
module and the batcher stay free of gRPC) and builds its own message. The servicers map them to
statuses in one place, `serving.rpc.grpc_errors`; anything else is INTERNAL.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base of every error the server reports to a caller."""

    code = "INTERNAL"


class InvalidArgument(ServingError):
    """The request itself is wrong: shape, datatype, size, parameter or image."""

    code = "INVALID_ARGUMENT"


class ModelNotFound(ServingError):
    code = "NOT_FOUND"

    def __init__(self, name: str, version: str = "", known: list[str] | None = None):
        what = f"model {name!r}" + (f" version {version!r}" if version else "")
        hint = f"; available: {', '.join(known)}" if known else ""
        super().__init__(f"{what} is not served here{hint}")


class QueueFull(ServingError):
    """Back-pressure: the batching queue holds `max_queue_size` images; fail at once, never block."""

    code = "RESOURCE_EXHAUSTED"

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


class InferenceFailed(ServingError):
    """The backend raised while computing a batch."""

    code = "INTERNAL"


class StartError(ServingError):
    """The server cannot start as configured; `hrnet serve` prints the message and exits 2."""

    code = "FAILED_PRECONDITION"


class ListenError(StartError):
    """A port cannot be bound (in use, or not permitted)."""


class TlsFileError(StartError):
    """A configured TLS certificate, key or CA file cannot be read."""


class ModelLoadError(StartError):
    """A model in the repository is missing, corrupt or misconfigured."""
