"""The event loop every server process runs on: uvloop where it is installed, else asyncio's own.

Each request crosses the model owner's event loop several times (its record in, the batch's end
from the instance thread, its answer out), and with `--workers` each front end's loop as well.
asyncio's own loop does that bookkeeping in Python: its selector, its handles, the wake-up of
`call_soon_threadsafe`. uvloop does it in C over libuv, behind the same API, so nothing else
changes; `event_loop: asyncio` keeps the standard loop (for debugging, or a platform without
uvloop wheels).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(kind: str) -> LoopFactory | None:
    """uvloop's loop for `auto` and `uvloop` when installed (ServerConfig refuses `uvloop` when it
    is not); None (asyncio's default) for `asyncio` (serving.config.EVENT_LOOPS)."""
    if kind == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], kind: str) -> T:
    """`asyncio.run(main)` on the loop `kind` names."""
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        return runner.run(main)


def resolve(kind: str) -> str:
    """The loop `kind` gives on this install: uvloop or asyncio (for logs and reports)."""
    return "asyncio" if loop_factory(kind) is None else "uvloop"
