"""A model instance: one backend and the one thread that makes every call on it (see base.py).

The thread opens the backend (`setup`: load and warm-up), then runs the jobs given to it one
at a time, then closes the backend. A batch (`run`) reports its end to a callback on this thread,
which the batcher turns into one call on its event loop: the hot path makes no Future (a lock, a
condition and a callback list per batch). Other calls (`submit`) get a
`concurrent.futures.Future`. An instance whose call hangs cannot be interrupted (no runtime can
be stopped mid-call from Python): the batcher stops waiting for it, closes it, which takes
effect when the call returns, and starts a `replacement` on a new thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)
_generation = itertools.count(1)
_PR_SET_NAME = 15  # prctl(2)
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
OS_NAME_POOL = "hrnet-pool"  # the runtime's threads, made while the instance loads
OS_NAME_INSTANCE = "hrnet-instance"


def name_os_thread(name: str) -> None:
    """Name the calling thread for the kernel (/proc/PID/task/TID/comm; top -H, py-spy, `hrnet
    bench overhead` read it). Python names its threads only for itself."""
    prctl = getattr(_libc, "prctl", None)
    if prctl is not None:
        prctl(_PR_SET_NAME, name.encode()[:15])


class BatchRunner(Protocol):
    """What an instance drives: a `Backend`, or anything with the same two calls."""

    def run(self, parts: Sequence[np.ndarray], rows: int) -> np.ndarray: ...

    def close(self) -> None: ...


# The end of a batch: its outputs, or the error it raised (then outputs is None).
Report = Callable[[np.ndarray | None, BaseException | None], None]
Job = tuple[Callable[[Any], Any], Report]


class ModelInstance:
    """Starts its thread at once; `ready` resolves to the backend after `setup`, or to its error."""

    def __init__(self, setup: Callable[[], BatchRunner], name: str) -> None:
        self._setup = setup
        self.name = name
        self.ready: Future[BatchRunner] = Future()
        self.closed: Future[None] = Future()
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        # Set before the jobs given so far are failed; read per job, where the Future's `done()`
        # and `exception()` took its lock twice per batch.
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"{name}#{next(_generation)}", daemon=True)
        self._thread.start()

    @property
    def thread_name(self) -> str:
        return self._thread.name

    def submit(self, fn: Callable[[BatchRunner], Any]) -> Future:
        """Call `fn(backend)` on this instance's thread, after the jobs before it."""
        future: Future = Future()

        def report(result: Any, error: BaseException | None) -> None:
            if future.set_running_or_notify_cancel():
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(error)

        self._put((fn, report))
        return future

    def run(self, parts: Sequence[np.ndarray], rows: int, report: Report) -> None:
        """Compute one batch on this instance's thread; `report(outputs, error)` is called there."""
        self._put((lambda backend: backend.run(parts, rows), report))

    def _put(self, job: Job) -> None:
        self._jobs.put(job)
        if self._failed is not None:  # no thread left to run it
            self._fail_pending(self._failed)

    def replacement(self) -> ModelInstance:
        """A fresh instance of the same model: a new thread that loads and warms up its own backend."""
        return ModelInstance(self._setup, self.name)

    def close(self) -> Future[None]:
        """Close the backend on its thread once the jobs already given are done; never blocks."""
        self._jobs.put(None)
        return self.closed

    def _main(self) -> None:
        # Threads inherit their creator's name: the runtime's pool, made during setup, gets this one.
        name_os_thread(OS_NAME_POOL)
        try:
            backend = self._setup()
        except BaseException as exc:  # the loader's error belongs to whoever awaits `ready`
            self._failed = exc
            if self.ready.set_running_or_notify_cancel():
                self.ready.set_exception(exc)
            self._fail_pending(exc)
            self.closed.set_result(None)
            return
        # `ready` is cancelled when its awaiter gave up while this loaded (asyncio.wrap_future
        # passes cancellation on: a replacement still loading at shutdown); the instance then
        # still runs what it is given and closes on close(), like any other.
        name_os_thread(OS_NAME_INSTANCE)
        if self.ready.set_running_or_notify_cancel():
            self.ready.set_result(backend)
        try:
            while (job := self._jobs.get()) is not None:
                fn, report = job
                try:
                    result = fn(backend)
                except BaseException as exc:  # reported to the caller, who decides
                    report(None, exc)
                else:
                    report(result, None)
        finally:
            try:
                backend.close()
            except Exception:
                log.exception("closing %s failed", self.thread_name)
            self.closed.set_result(None)

    def _fail_pending(self, error: BaseException) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job[1](None, error)
