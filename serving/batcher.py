"""Dynamic batching: many small requests in, few large backend calls out.

Knows nothing of gRPC or of any backend beyond `Runner`. One scheduler task takes a free
model instance, then forms a batch: it waits for the first request, then until the batch is
full, the largest preferred size is reached, or `max_queue_delay_us` has passed since the later
of the oldest request's arrival and the instance becoming free; with `adaptive_delay` not at all
when, at the recent arrival rate, no other request is due before that. Taking the instance first
means that while every instance is busy, requests pile up and the next batch is larger at no
extra delay.

The delay counts from the instance becoming free, not only from the oldest arrival, because of
closed loops (callers that send their next request when the answer comes): with one instance
busy, the request queued during a batch has already waited longer than the delay when the
instance frees, so counting from its arrival dispatched it alone just before the batch's callers
sent their next requests, and batches alternated between nearly full and one image (15, 1, 15,
1 with 16 callers). Waiting up to the delay after the instance freed lets them join.

The requests' arrays go to the instance as they are (no concatenation here): the instance
copies them once into its own batch buffer, padded up to the next of `buckets` when given, so
the runtime only ever meets the batch sizes it warmed up. Each instance computes on its own
thread (`serving.backends.instance`); a batch that takes longer than `execution_timeout_s`
fails with `ExecutionTimeout` and its instance is replaced by a fresh one while the others
keep serving.

Guarantees: every future is resolved (result, error or cancellation); a cancelled or expired
request is dropped before compute; a request waits for company at most `max_queue_delay_us`
beyond the moment an instance is free to take it (so at most that long when one is free on its
arrival); the queue is bounded in images and fails fast with `QueueFull`; deadlines are absolute
times on the injectable `clock` (time.monotonic).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from serving.config import BatchingConfig
from serving.errors import (
    DeadlineExceeded,
    ExecutionTimeout,
    InferenceFailed,
    InvalidArgument,
    QueueFull,
    Unavailable,
)

log = logging.getLogger(__name__)
GAP_SMOOTHING = 0.2  # weight of the newest inter-arrival gap in the running mean
REPLACEMENT_RETRY_S = 5.0  # pause before trying again when a replacement instance fails to load


class Runner(Protocol):
    """One model instance (`serving.backends.instance.ModelInstance`), already loaded."""

    def run(self, parts: Sequence[np.ndarray], rows: int) -> Future[np.ndarray]:
        """Compute the rows of `parts` (N in all) padded to `rows`; resolves to (N, ...) outputs."""
        ...

    def replacement(self) -> Runner:
        """A fresh instance of the same model, loading on a new thread; `ready` resolves when loaded."""
        ...

    @property
    def ready(self) -> Future: ...

    def close(self) -> Future[None]: ...


@dataclass(frozen=True)
class BatchRecord:
    """What one executed batch looked like, for statistics and metrics."""

    size: int  # images
    padding: int  # zero rows added to reach a bucket
    requests: int
    queue_s: tuple[float, ...]  # per request: enqueue -> batch start
    compute_s: float
    ok: bool


@dataclass(frozen=True)
class RunTiming:
    """When one request (or chunk of one) was queued, left the queue in a batch, was computed and
    answered, on the batcher's clock; what tracing turns into its queue, batch and compute spans."""

    enqueued: float
    started: float  # taken into a batch
    compute_started: float
    compute_ended: float
    finished: float  # its outputs handed back
    batch_size: int  # images in the batch
    batch_requests: int


class BatchListener(Protocol):
    def batch_done(self, record: BatchRecord) -> None: ...

    def dropped(self, images: int, reason: str) -> None: ...

    def instance_replaced(self) -> None: ...


class _State(enum.Enum):
    QUEUED = 1
    RUNNING = 2
    DROPPED = 3


@dataclass(eq=False)
class _Task:
    items: np.ndarray
    future: asyncio.Future[np.ndarray]
    enqueued: float
    deadline: float | None
    on_run: Callable[[RunTiming], None] | None = None
    state: _State = _State.QUEUED

    @property
    def size(self) -> int:
        return int(self.items.shape[0])


@dataclass(order=True)
class _Entry:
    priority: int
    seq: int
    task: _Task = field(compare=False)


class Batcher:
    """Batches `submit` calls onto `runners`, at most one batch per runner at a time.

    `buckets`: the sizes batches are padded up to (empty: each batch runs at its own size).
    `execution_timeout_s`: how long one batch may compute before its instance is replaced (0: no limit).
    """

    def __init__(
        self,
        runners: Sequence[Runner],
        config: BatchingConfig,
        listener: BatchListener | None = None,
        clock: Callable[[], float] = time.monotonic,
        buckets: Sequence[int] = (),
        execution_timeout_s: float = 0.0,
    ) -> None:
        if not runners:
            raise ValueError("a batcher needs at least one runner")
        if buckets and max(buckets) < config.max_batch_size:
            raise ValueError(f"buckets {list(buckets)} do not reach max_batch_size {config.max_batch_size}")
        self.config = config
        self._runners = list(runners)
        self._buckets = tuple(sorted(buckets))
        self._timeout_s = execution_timeout_s
        self._listener = listener
        self._clock = clock
        self._replacing: set[asyncio.Task[None]] = set()
        self._heap: list[_Entry] = []
        self._seq = itertools.count()
        self._queued_images = 0
        self._running: set[asyncio.Task[None]] = set()
        self._closing = False
        self._last_arrival: float | None = None
        self._mean_gap: float | None = None  # smoothed seconds between requests
        # asyncio primitives belong to the running loop: made in start().
        self._arrival: asyncio.Event | None = None
        self._free: asyncio.Queue[tuple[Runner, float]] | None = None  # with when it became free
        self._idle: asyncio.Event | None = None
        self._scheduler: asyncio.Task[None] | None = None

    @property
    def queued_images(self) -> int:
        return self._queued_images

    @property
    def runners(self) -> list[Runner]:
        """The instances serving now (a replaced one leaves this list, its replacement joins it)."""
        return list(self._runners)

    async def start(self) -> None:
        self._arrival = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._free = asyncio.Queue()
        for runner in self._runners:
            self._release(runner)
        self._scheduler = asyncio.create_task(self._schedule(), name="batcher")

    async def submit(
        self,
        items: np.ndarray,
        deadline: float | None = None,
        priority: int = 0,
        on_run: Callable[[RunTiming], None] | None = None,
    ) -> np.ndarray:
        """Run `items` (N, ...) through a model instance; return its outputs (N, ...) in order.

        `deadline` is an absolute `clock()` time by which the request must have left the queue;
        `priority` orders the queue, lower first. Requests larger than `max_batch_size` are split
        into chunks that batch independently, and their outputs are merged back. `on_run` is
        called with each computed chunk's timings.
        """
        if self._scheduler is None or self._closing:
            raise Unavailable("the server is shutting down and accepts no new work")
        n = int(items.shape[0]) if items.ndim else 0
        if n < 1:
            raise InvalidArgument(f"a request needs at least one item, got shape {list(items.shape)}")
        if n > self.config.max_queue_size:  # could never be queued: the request, not the load, is wrong
            raise InvalidArgument(
                f"a request of {n} items exceeds max_queue_size {self.config.max_queue_size}; "
                "send fewer per request"
            )
        if self._queued_images + n > self.config.max_queue_size:
            raise QueueFull(self._queued_images, n, self.config.max_queue_size)
        now = self._clock()
        self._note_arrival(now)
        step = self.config.max_batch_size
        tasks = [
            self._enqueue(items[i : i + step], now, deadline, priority, on_run) for i in range(0, n, step)
        ]
        try:
            outputs = [await self._wait(task) for task in tasks]
        finally:
            for task in tasks:
                self._abandon(task)
            await self._until_released(tasks)
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    @staticmethod
    async def _until_released(tasks: list[_Task]) -> None:
        """Wait out the batches still reading these tasks' items (their caller was cancelled).

        So `submit` never returns while a batch reads `items`: callers may reuse the memory at
        once (a front end's shared-memory slot), cancelled or not.
        """
        running = [t.future for t in tasks if t.state is _State.RUNNING and not t.future.done()]
        if running:
            await asyncio.wait(running)
            for future in running:
                if not future.cancelled():
                    future.exception()  # seen: the caller is gone, nobody else will look

    def _enqueue(
        self,
        items: np.ndarray,
        now: float,
        deadline: float | None,
        priority: int,
        on_run: Callable[[RunTiming], None] | None,
    ) -> _Task:
        loop = asyncio.get_running_loop()
        task = _Task(items=items, future=loop.create_future(), enqueued=now, deadline=deadline, on_run=on_run)
        heapq.heappush(self._heap, _Entry(priority, next(self._seq), task))
        self._queued_images += task.size
        assert self._arrival is not None and self._idle is not None
        self._idle.clear()
        self._arrival.set()
        return task

    async def _wait(self, task: _Task) -> np.ndarray:
        # Shielded: a cancelled caller must not cancel a running task's future, which resolves
        # only when its batch is done with the items (see _until_released).
        if task.deadline is None:
            return await asyncio.shield(task.future)
        remaining = task.deadline - self._clock()
        try:
            return await asyncio.wait_for(asyncio.shield(task.future), timeout=max(remaining, 0.0))
        except TimeoutError:
            if task.state is _State.RUNNING:  # the deadline bounds queueing; computing work finishes
                return await asyncio.shield(task.future)
            self._drop(task, "expired", DeadlineExceeded(self._clock() - task.enqueued))
            return await task.future

    def _abandon(self, task: _Task) -> None:
        """The caller is gone (cancelled, or a sibling chunk failed): drop the task if still queued."""
        if task.state is _State.QUEUED:
            self._drop(task, "cancelled", None)

    def _drop(self, task: _Task, reason: str, error: Exception | None) -> None:
        if task.state is not _State.QUEUED:
            return
        task.state = _State.DROPPED
        self._queued_images -= task.size
        if not task.future.done():
            if error is None:
                task.future.cancel()
            else:
                task.future.set_exception(error)
        if self._listener:
            self._listener.dropped(task.size, reason)

    async def _schedule(self) -> None:
        assert self._free is not None
        while True:
            runner, freed = await self._free.get()
            tasks = await self._next_batch(freed)
            job = asyncio.create_task(self._execute(runner, tasks))
            self._running.add(job)
            assert self._idle is not None
            self._idle.clear()
            job.add_done_callback(self._job_done)

    def _job_done(self, job: asyncio.Task[None]) -> None:
        self._running.discard(job)
        if not self._running and not self._queued_images and self._idle is not None:
            self._idle.set()

    def _head(self) -> _Task | None:
        """The next live task, discarding dropped ones and failing expired ones."""
        now = self._clock()
        while self._heap:
            task = self._heap[0].task
            if task.state is _State.QUEUED and task.deadline is not None and now >= task.deadline:
                self._drop(task, "expired", DeadlineExceeded(now - task.enqueued))
            if task.state is _State.QUEUED:
                return task
            heapq.heappop(self._heap)
        return None

    def _release(self, runner: Runner) -> None:
        """`runner` is free to take the next batch, as of now."""
        assert self._free is not None
        self._free.put_nowait((runner, self._clock()))

    async def _next_batch(self, freed: float) -> list[_Task]:
        """The next batch for an instance free since `freed` (see the module's docstring)."""
        assert self._arrival is not None
        cfg = self.config
        target = max(cfg.preferred_batch_sizes, default=cfg.max_batch_size)
        while True:
            self._arrival.clear()
            head = self._head()
            if head is None:
                if self._idle is not None and not self._running:
                    self._idle.set()
                await self._arrival.wait()
                continue
            wait_until = max(head.enqueued, freed) + cfg.max_queue_delay_us / 1e6
            wait_s = wait_until - self._clock()
            full = self._queued_images >= target
            if full or wait_s <= 0 or self._closing or self._no_company_expected(wait_until):
                return self._take()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrival.wait(), timeout=wait_s)

    def _note_arrival(self, now: float) -> None:
        """Track the recent gap between requests (smoothed; idle periods count as 2x the delay)."""
        if self._last_arrival is not None:
            gap = min(now - self._last_arrival, 2 * self.config.max_queue_delay_us / 1e6)
            self._mean_gap = (
                gap if self._mean_gap is None else self._mean_gap + GAP_SMOOTHING * (gap - self._mean_gap)
            )
        self._last_arrival = now

    def _no_company_expected(self, wait_until: float) -> bool:
        """At the recent arrival rate, would the next request come only after the wait ends?

        Then waiting adds latency and buys no batching: at low load a lone request goes at once.
        With no history yet nothing suggests company is coming either.
        """
        if not self.config.adaptive_delay:
            return False
        if self._mean_gap is None or self._last_arrival is None:
            return True
        return self._last_arrival + self._mean_gap > wait_until

    def _take(self) -> list[_Task]:
        cfg = self.config
        limit = min(self._queued_images, cfg.max_batch_size)
        fitting = [s for s in cfg.preferred_batch_sizes if s <= limit]
        if fitting and limit < cfg.max_batch_size:
            limit = max(fitting)
        batch: list[_Task] = []
        size = 0
        while (head := self._head()) is not None and (not batch or size + head.size <= limit):
            heapq.heappop(self._heap)
            head.state = _State.RUNNING
            self._queued_images -= head.size
            batch.append(head)
            size += head.size
        return batch

    def _rows(self, size: int) -> int:
        """The bucket a batch of `size` images is padded up to (itself without buckets)."""
        return next((b for b in self._buckets if b >= size), size)

    async def _execute(self, runner: Runner, tasks: list[_Task]) -> None:
        keep = True  # whether `runner` goes back to serving afterwards
        try:
            tasks = [t for t in tasks if not t.future.done()]  # cancelled after being taken
            if not tasks:
                return
            start = self._clock()
            size = sum(t.size for t in tasks)
            rows = self._rows(size)
            ok = False
            compute_started = self._clock()
            try:
                outputs = await asyncio.wait_for(
                    asyncio.wrap_future(runner.run([t.items for t in tasks], rows)), self._timeout_s or None
                )
                if outputs.shape[0] != size:
                    raise InferenceFailed(
                        f"the model returned {outputs.shape[0]} outputs for a batch of {size}"
                    )
                ok = True
            except TimeoutError:
                log.error(
                    "batch of %d ran past execution_timeout_s %g s: replacing its instance",
                    size,
                    self._timeout_s,
                )
                keep = False
                self._fail(tasks, ExecutionTimeout(self._timeout_s))
                self._replace(runner)
            except Exception as exc:
                log.exception("batch of %d failed", size)
                self._fail(
                    tasks,
                    exc if isinstance(exc, InferenceFailed) else InferenceFailed(f"inference failed: {exc}"),
                )
            compute_ended = self._clock()
            compute_s = compute_ended - start
            if ok:
                offset = 0
                for task in tasks:
                    if not task.future.done():
                        task.future.set_result(outputs[offset : offset + task.size])
                    offset += task.size
                finished = self._clock()
                for task in tasks:
                    if task.on_run:
                        task.on_run(
                            RunTiming(
                                task.enqueued,
                                start,
                                compute_started,
                                compute_ended,
                                finished,
                                size,
                                len(tasks),
                            )
                        )
            if self._listener:
                self._listener.batch_done(
                    BatchRecord(
                        size=size,
                        padding=rows - size,
                        requests=len(tasks),
                        queue_s=tuple(start - t.enqueued for t in tasks),
                        compute_s=compute_s,
                        ok=ok,
                    )
                )
        finally:
            # cancelled mid-batch at shutdown: still answer every caller
            self._fail(tasks, Unavailable("the server shut down while this request ran"))
            if keep:
                self._release(runner)

    @staticmethod
    def _fail(tasks: list[_Task], error: Exception) -> None:
        for task in tasks:
            if not task.future.done():
                task.future.set_exception(error)

    def _replace(self, runner: Runner) -> None:
        """Retire a hung instance (it closes when its call returns, if ever) and bring up a fresh
        one in the background; the other instances keep taking batches meanwhile."""
        runner.close()
        self._runners.remove(runner)
        if self._listener:
            self._listener.instance_replaced()
        task = asyncio.create_task(self._bring_up(runner), name="replace-instance")
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def _bring_up(self, retired: Runner) -> None:
        """Load replacements of `retired` until one is ready (each failure logged), then serve it."""
        while True:
            fresh = retired.replacement()
            try:
                await asyncio.wrap_future(fresh.ready)
                break
            except asyncio.CancelledError:
                fresh.close()  # shutting down: it closes once loaded
                raise
            except Exception:
                log.exception("a replacement instance failed to load; retrying in %g s", REPLACEMENT_RETRY_S)
                await asyncio.sleep(REPLACEMENT_RETRY_S)
        self._runners.append(fresh)
        self._release(fresh)
        log.info("replacement instance ready")

    async def close(self, grace_s: float = 0.0) -> bool:
        """Stop accepting work, let queued and running work finish within `grace_s`, then stop.

        Returns True when everything accepted finished; what is left is failed with Unavailable.
        """
        self._closing = True
        drained = True
        if self._scheduler is not None and self._idle is not None and self._arrival is not None:
            self._arrival.set()  # flush: no more waiting for stragglers
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
            except TimeoutError:
                drained = False
            self._scheduler.cancel()
            gone = Unavailable("the server shut down before this request ran")
            for entry in self._heap:
                self._drop(entry.task, "shutdown", gone)
            self._heap.clear()
            for job in list(self._running):
                job.cancel()
        for task in list(self._replacing):
            task.cancel()
        return drained
