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
thread (`serving.engine.backends.instance`); a batch that takes longer than `execution_timeout_s`
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
import collections
import contextlib
import enum
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from serving.config import BatchingConfig
from serving.engine.backends.instance import Report
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
FRUITLESS_SKIPS = 8  # batches sent at once when waits gain next to nothing (_no_company_expected)
WAIT_GAIN_SMOOTHING = 0.5  # weight of the newest wait's gain in the running mean
MIN_WAIT_GAIN = 0.5  # images a wait must bring on average to be worth its delay


def check_request_size(n: int, max_queue_size: int) -> None:
    """A request of `n` images that no queue of `max_queue_size` could ever hold: the request, not
    the load, is wrong. Front ends apply it before decoding; `Batcher.admit` for everything."""
    if n > max_queue_size:
        raise InvalidArgument(
            f"a request of {n} images exceeds max_queue_size {max_queue_size}; send fewer per request"
        )


class Runner(Protocol):
    """One model instance (`serving.engine.backends.instance.ModelInstance`), already loaded."""

    def run(self, parts: Sequence[np.ndarray], rows: int, report: Report) -> None:
        """Compute the rows of `parts` (N in all) padded to `rows`, then call `report` with the
        (N, ...) outputs or the error, on the instance's thread."""
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


# What a request handed over with `Batcher.put` is told when it ends: the task, its outputs (None
# on failure) and the error (None on success; asyncio.CancelledError when dropped unasked).
OnDone = Callable[["_Task", np.ndarray | None, BaseException | None], None]


@dataclass(eq=False, slots=True)
class _Task:
    """One queued request (or chunk of one). Its end goes to `future` (`submit`, awaited) or to
    `on_done` (`put`, for callers that keep no coroutine per request); `ref` is the caller's."""

    items: np.ndarray
    enqueued: float
    deadline: float | None
    future: asyncio.Future[np.ndarray] | None = None
    on_done: OnDone | None = None
    ref: Any = None
    on_run: Callable[[RunTiming], None] | None = None
    state: _State = _State.QUEUED
    finished: bool = False
    size: int = 0  # rows of `items`, set on creation

    def __post_init__(self) -> None:
        self.size = len(self.items)

    def finish(self, outputs: np.ndarray | None, error: BaseException | None) -> None:
        """Resolve once; later calls do nothing."""
        if self.finished:
            return
        self.finished = True
        if self.future is not None:
            if self.future.done():
                return
            if error is None:
                self.future.set_result(outputs)  # type: ignore[arg-type]
            elif isinstance(error, asyncio.CancelledError):
                self.future.cancel()
            else:
                self.future.set_exception(error)
        elif self.on_done is not None:
            self.on_done(self, outputs, error)


# Queue entries: (priority, arrival number, task), compared as tuples (in C: the heap is hot).
_Entry = tuple[int, int, _Task]


@dataclass(eq=False, slots=True)
class _Job:
    """One batch on one instance."""

    runner: Runner
    tasks: list[_Task]
    size: int  # images
    rows: int  # padded to
    start: float
    due: float = 0.0  # when execution_timeout_s runs out, on the loop's clock (timers run on it)
    over: bool = False  # answered (done, timed out or failed at shutdown): later news is ignored


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
        self._running: set[_Job] = set()
        self._closing = False
        self._last_arrival: float | None = None
        self._mean_gap: float | None = None  # smoothed seconds between requests
        self._free: collections.deque[tuple[Runner, float]] = collections.deque()  # with when it freed
        self._timer: asyncio.TimerHandle | None = None  # the wait for company, while one runs
        self._watchdog: asyncio.TimerHandle | None = None  # the next execution_timeout_s due
        self._kick_scheduled: asyncio.Handle | None = None
        self._wait_base: int | None = None  # images queued when the current wait began
        self._holding = False
        # Told (this batcher, True) when a batch starts waiting for company that reading requests
        # now would not bring sooner, and (this batcher, False) when that ends: see `_hold`.
        self.on_hold: Callable[[Batcher, bool], None] | None = None
        self._skip_waits = 0  # batches still to go without waiting, after fruitless waits
        self._wait_gain: float | None = None  # smoothed images that joined a batch while it waited
        # Bound to the running loop: made in start().
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: asyncio.Event | None = None

    @property
    def queued_images(self) -> int:
        return self._queued_images

    @property
    def runners(self) -> list[Runner]:
        """The instances serving now (a replaced one leaves this list, its replacement joins it)."""
        return list(self._runners)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        for runner in self._runners:
            self._release(runner)

    def admit(self, n: int, reserved: int = 0) -> None:
        """The queue rule, the one place it lives: `n` more images fit beside those queued and
        `reserved` (admitted by the caller, still being decoded); InvalidArgument for a request no
        queue could hold, QueueFull for one that does not fit now, Unavailable when closing."""
        if self._loop is None or self._closing:
            raise Unavailable("the server is shutting down and accepts no new work")
        limit = self.config.max_queue_size
        if n > limit:  # could never be queued: the request, not the load, is wrong
            raise InvalidArgument(
                f"a request of {n} images exceeds max_queue_size {limit}; send fewer per request"
            )
        waiting = self._queued_images + reserved
        if waiting + n > limit:
            raise QueueFull(waiting, n, limit)

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
        n = int(items.shape[0]) if items.ndim else 0
        if n < 1:
            raise InvalidArgument(f"a request needs at least one item, got shape {list(items.shape)}")
        self.admit(n)
        now = self._clock()
        self._note_arrival(now)
        step = self.config.max_batch_size
        loop = asyncio.get_running_loop()
        tasks = [
            self._enqueue(
                _Task(items[i : i + step], now, deadline, loop.create_future(), on_run=on_run), priority
            )
            for i in range(0, n, step)
        ]
        try:
            outputs = [await self._wait(task) for task in tasks]
        finally:
            for task in tasks:
                self._abandon(task)
            await self._until_released(tasks)
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def put(
        self, items: np.ndarray, deadline: float | None, priority: int, on_done: OnDone, ref: Any = None
    ) -> _Task:
        """Queue `items` (N <= max_batch_size rows, admitted with `admit`) without a coroutine:
        `on_done(task, outputs, error)` runs on the loop when it ends, after its batch has read
        `items`. `withdraw` takes it back while it is still queued.

        The arrival rate counts when the batcher got the request, as the waits do, not a front
        end's stamp: a JPEG comes 2 ms of decoding after its stamp, and by the stamps the next
        request would always look due before the wait ends, so even a lone one would wait it out."""
        if not 1 <= len(items) <= self.config.max_batch_size:
            raise ValueError(f"put takes 1..max_batch_size rows, got {len(items)}")
        now = self._clock()
        self._note_arrival(now)
        return self._enqueue(_Task(items, now, deadline, on_done=on_done, ref=ref), priority)

    def withdraw(self, task: _Task, expired: bool) -> None:
        """A `put` request's deadline passed (DEADLINE_EXCEEDED) or its caller left (cancelled):
        dropped if still queued; a running one finishes and is answered as usual."""
        if expired:
            self._drop(task, "expired", DeadlineExceeded(self._clock() - task.enqueued))
        else:
            self._drop(task, "cancelled", None)

    @staticmethod
    async def _until_released(tasks: list[_Task]) -> None:
        """Wait out the batches still reading these tasks' items (their caller was cancelled).

        So `submit` never returns while a batch reads `items`: callers may reuse the memory at
        once (a front end's shared-memory slot), cancelled or not.
        """
        running = [t.future for t in tasks if t.state is _State.RUNNING and t.future and not t.future.done()]
        if running:
            await asyncio.wait(running)
            for future in running:
                if not future.cancelled():
                    future.exception()  # seen: the caller is gone, nobody else will look

    def _enqueue(self, task: _Task, priority: int) -> _Task:
        heapq.heappush(self._heap, (priority, next(self._seq), task))
        self._queued_images += task.size
        assert self._idle is not None
        self._idle.clear()
        self._kick_soon()
        return task

    def _kick_soon(self) -> None:
        """Decide at the end of this loop turn, once every request that arrived in it is queued (a
        front end's frame brings several): deciding at the first would send it alone."""
        if self._kick_scheduled is None and self._loop is not None:
            self._kick_scheduled = self._loop.call_soon(self._kick)

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
        task.finish(None, error or asyncio.CancelledError())
        if self._listener:
            self._listener.dropped(task.size, reason)

    def _head(self) -> _Task | None:
        """The next live task, discarding dropped ones and failing expired ones."""
        now = self._clock()
        while self._heap:
            task = self._heap[0][2]
            if task.state is _State.QUEUED and task.deadline is not None and now >= task.deadline:
                self._drop(task, "expired", DeadlineExceeded(now - task.enqueued))
            if task.state is _State.QUEUED:
                return task
            heapq.heappop(self._heap)
        return None

    def _release(self, runner: Runner) -> None:
        """`runner` is free to take the next batch, as of now."""
        self._free.append((runner, self._clock()))
        self._kick_soon()

    def _kick(self) -> None:
        """Give every free instance its next batch, or wait for company (see the module docstring):
        a timer then calls this again, as does every arrival and every instance freed meanwhile."""
        self._kick_scheduled = None
        self._hold(False)  # what arrived while holding is queued now, before deciding ...
        if self._kick_scheduled is not None:  # ... so the kick it asked for is this one
            self._kick_scheduled.cancel()
            self._kick_scheduled = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        cfg = self.config
        target = max(cfg.preferred_batch_sizes, default=cfg.max_batch_size)
        while self._free:
            head = self._head()
            if head is None:
                break
            runner, freed = self._free[0]
            wait_until = max(head.enqueued, freed) + cfg.max_queue_delay_us / 1e6
            now = self._clock()
            full = self._queued_images >= target
            if not (full or wait_until <= now or self._closing or self._no_company_expected(wait_until)):
                assert self._loop is not None
                self._timer = self._loop.call_later(wait_until - now, self._kick)
                self._hold(self._no_fill_before(wait_until, now, target))
                if self._wait_base is None:
                    self._wait_base = self._queued_images
                break
            if self._wait_base is not None:
                self._wait_ended(max(self._queued_images - self._wait_base, 0))
            self._free.popleft()
            self._dispatch(runner, self._take())
        self._check_idle()

    def _wait_ended(self, gained: int) -> None:
        """Weigh what the wait just ended brought: when waits bring next to nothing on average,
        the next FRUITLESS_SKIPS batches go at once (`_no_company_expected`)."""
        self._wait_base = None
        mean = self._wait_gain
        self._wait_gain = gained if mean is None else mean + WAIT_GAIN_SMOOTHING * (gained - mean)
        if self._wait_gain < MIN_WAIT_GAIN:
            self._skip_waits = FRUITLESS_SKIPS

    def _no_fill_before(self, wait_until: float, now: float, target: int) -> bool:
        """At the recent arrival rate, will the batch still be short of `target` when the wait ends?"""
        if self._mean_gap is None:
            return False
        expected = (wait_until - now) / self._mean_gap if self._mean_gap > 0 else float("inf")
        return self._queued_images + expected < target

    def _hold(self, holding: bool) -> None:
        """Tell `on_hold` that the batch waits for company it will get no sooner by reading
        requests as they come (True), or that this ended (False).

        Then the batch goes when its wait ends, and every request arriving meanwhile would only be
        queued: the model owner stops reading its front ends' links until the next `_kick` and
        reads what came in one go. Read as they came, one small frame at a time, each woke the
        owner's event loop (docs/serving.md).
        """
        if holding != self._holding:
            self._holding = holding
            if self.on_hold is not None:
                self.on_hold(self, holding)

    def _check_idle(self) -> None:
        if self._idle is not None and not self._running and not self._queued_images:
            self._idle.set()

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
        With no history yet nothing suggests company is coming either. Nor do waits that bring
        next to nothing (under MIN_WAIT_GAIN images each, on average): then the next
        FRUITLESS_SKIPS batches go at once. That is a closed loop whose callers are all queued
        (one sequential client): the gaps between its requests are the waits themselves, so the
        rate alone would keep every request waiting the full delay. The mean, not the last wait
        alone, decides: under load from many callers one wait in five gains nothing by chance
        (at 1.6 requests due per wait), and skipping after each of those made batches of one
        (JPEG at 800 requests/s, 2 ms delay: a mean batch of 2.5 where the waits give 3.5).
        """
        if not self.config.adaptive_delay:
            return False
        if self._skip_waits:
            self._skip_waits -= 1
            return True
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

    def _dispatch(self, runner: Runner, tasks: list[_Task]) -> None:
        """Hand `tasks` to `runner`; `_completed` runs on the loop when it is done, `_timed_out` if
        it takes longer than execution_timeout_s (see `_watch`)."""
        assert self._loop is not None
        start = self._clock()
        size = sum(t.size for t in tasks)
        job = _Job(runner, tasks, size, self._rows(size), start)
        self._running.add(job)
        if self._timeout_s:
            job.due = self._loop.time() + self._timeout_s
            if self._watchdog is None:
                self._watchdog = self._loop.call_at(job.due, self._watch)
        loop = self._loop

        def computed(outputs: np.ndarray | None, error: BaseException | None) -> None:  # instance thread
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting any more
                loop.call_soon_threadsafe(self._completed, job, outputs, error)

        try:
            runner.run([t.items for t in tasks], job.rows, computed)
        except Exception as exc:  # a runner that cannot even take the batch
            self._completed(job, None, exc)

    def _completed(self, job: _Job, outputs: np.ndarray | None, error: BaseException | None) -> None:
        if job.over:  # timed out, or failed at shutdown, before the instance answered
            return
        job.over = True
        self._running.discard(job)
        compute_ended = self._clock()
        tasks, size = job.tasks, job.size
        if error is None and (outputs is None or outputs.shape[0] != size):
            got = "no" if outputs is None else outputs.shape[0]
            error = InferenceFailed(f"the model returned {got} outputs for a batch of {size}")
        ok = error is None
        if not ok:
            log.error("batch of %d failed", size, exc_info=error)
            if not isinstance(error, InferenceFailed):
                error = InferenceFailed(f"inference failed: {error}")
            self._fail(tasks, error)
        else:
            assert outputs is not None
            offset = 0
            for task in tasks:
                task.finish(outputs[offset : offset + task.size], None)
                offset += task.size
            finished = self._clock()
            for task in tasks:
                if task.on_run:
                    task.on_run(
                        RunTiming(
                            task.enqueued, job.start, job.start, compute_ended, finished, size, len(tasks)
                        )
                    )
        self._batch_done(job, compute_ended - job.start, ok)
        self._release(job.runner)

    def _watch(self) -> None:
        """Time out every batch past execution_timeout_s, then wait for the next one due.

        One timer for all running batches, armed at the earliest deadline, not one per batch: a
        batch of a fast model ends long before its timeout, so a timer made and cancelled per
        batch was a handle and a heap entry of the owner's busiest thread spent on nothing.
        """
        assert self._loop is not None
        self._watchdog = None
        now = self._loop.time()
        for job in [j for j in self._running if j.due <= now]:
            self._timed_out(job)
        if self._running:
            self._watchdog = self._loop.call_at(min(j.due for j in self._running), self._watch)

    def _timed_out(self, job: _Job) -> None:
        if job.over:
            return
        job.over = True
        self._running.discard(job)
        log.error(
            "batch of %d ran past execution_timeout_s %g s: replacing its instance", job.size, self._timeout_s
        )
        self._fail(job.tasks, ExecutionTimeout(self._timeout_s))
        self._batch_done(job, self._clock() - job.start, False)
        self._replace(job.runner)
        self._check_idle()

    def _batch_done(self, job: _Job, compute_s: float, ok: bool) -> None:
        if self._listener:
            self._listener.batch_done(
                BatchRecord(
                    size=job.size,
                    padding=job.rows - job.size,
                    requests=len(job.tasks),
                    queue_s=tuple(job.start - t.enqueued for t in job.tasks),
                    compute_s=compute_s,
                    ok=ok,
                )
            )

    @staticmethod
    def _fail(tasks: list[_Task], error: Exception) -> None:
        for task in tasks:
            task.finish(None, error)

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
        if self._loop is not None and self._idle is not None:
            self._kick()  # flush: no more waiting for stragglers
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
            except TimeoutError:
                drained = False
            for timer in (self._timer, self._watchdog):
                if timer is not None:
                    timer.cancel()
            self._timer = self._watchdog = None
            gone = Unavailable("the server shut down before this request ran")
            for _, _, task in self._heap:
                self._drop(task, "shutdown", gone)
            self._heap.clear()
            for job in list(self._running):  # their instances answer into the void
                job.over = True
                self._fail(job.tasks, Unavailable("the server shut down while this request ran"))
            self._running.clear()
        for task in list(self._replacing):
            task.cancel()
        return drained
