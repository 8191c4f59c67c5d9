"""An asyncio event loop in a thread of its own: how synchronous code (a notebook, a test, a script)
runs the asyncio server beside it. `serving.Server.start_background` uses it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from serving.event_loop import LoopFactory

T = TypeVar("T")


class BackgroundLoop:
    def __init__(self, name: str, loop_factory: LoopFactory | None = None) -> None:
        self.loop = (loop_factory or asyncio.new_event_loop)()
        # A daemon: a forgotten server must not keep the interpreter from exiting.
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run `coro` on the loop and wait for its result (raising what it raised)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Cancel whatever still runs on the loop, stop it and join the thread."""
        if self.loop.is_closed():
            return

        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_asyncgens()
            await self.loop.shutdown_default_executor()  # as asyncio.run does: no thread outlives it

        with contextlib.suppress(Exception):
            self.run(cancel_the_rest(), timeout_s)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self.loop.close()
