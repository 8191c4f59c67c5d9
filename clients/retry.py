"""When to try a failed call again, and how long to wait first.

UNAVAILABLE (server restarting, connection refused, GOAWAY), RESOURCE_EXHAUSTED (the server's
queue is full and it shed load) and CANCELLED are the statuses where the same request can succeed
a moment later. This client never cancels a call it still waits for (its own limit is the
deadline, DEADLINE_EXCEEDED), so a CANCELLED it sees came from the server side: gRPC cancels the
calls still open when a stopping server's grace period ends.
Waits grow exponentially so a struggling server is not hammered, and carry random jitter so
many clients that failed together do not come back together. The call's deadline bounds the whole
sequence: no attempt is started that the deadline would cut off anyway.

Retrying re-sends the request. Classification is idempotent, so that is safe by default; a caller
whose requests have side effects passes `RetryPolicy.off()`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import grpc

RETRYABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}
)
# gRPC also reports a message or metadata over a size limit as RESOURCE_EXHAUSTED, at either end
# ("Received message larger than max", "received metadata size exceeds hard limit"): the same
# request would fail the same way, so these are not retried.
SIZE_LIMIT_PHRASES = ("larger than max", "metadata size exceeds")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6  # first try included; 1 disables retries
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0  # long enough to ride out a server restart, short enough to stay responsive
    multiplier: float = 2.0
    jitter: float = 0.5  # each wait is scaled by a random factor in [1 - jitter, 1]
    codes: frozenset[grpc.StatusCode] = field(default=RETRYABLE_CODES)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(
                f"need 0 <= initial_backoff_s <= max_backoff_s, "
                f"got {self.initial_backoff_s} and {self.max_backoff_s}"
            )
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    @classmethod
    def off(cls) -> RetryPolicy:
        """One attempt only: for requests that must not be sent twice."""
        return cls(max_attempts=1)

    def backoff_s(self, attempt: int) -> float:
        """The wait after failed attempt number `attempt` (1-based), jitter applied."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return base * (1 - self.jitter * random.random())

    def retryable(self, code: grpc.StatusCode, message: str = "") -> bool:
        if code not in self.codes:
            return False
        lowered = message.lower()
        return not (
            code == grpc.StatusCode.RESOURCE_EXHAUSTED and any(p in lowered for p in SIZE_LIMIT_PHRASES)
        )

    def next_wait_s(
        self, attempt: int, code: grpc.StatusCode, remaining_s: float | None, message: str = ""
    ) -> float | None:
        """How long to wait before attempt `attempt + 1`, or None to give up and raise."""
        if attempt >= self.max_attempts or not self.retryable(code, message):
            return None
        wait = self.backoff_s(attempt)
        if remaining_s is not None and wait >= remaining_s:
            return None
        return wait
