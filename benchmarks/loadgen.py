"""The load generator: closed or open loop from worker processes, on requests serialized once.

At GPU rates one Python process cannot both serialize 600 KB requests and keep hundreds in
flight, and a generator that saturates first measures itself. So the load comes from `workers`
processes (each its own asyncio loop and `Workload.connections` gRPC connections per server),
every request is serialized once in the parent and sent as bytes, unary responses are not even
parsed, and the generator's own CPU time over the measured window is reported next to the
figures it produced.

Several connections per process, not one: a server of several processes on one port
(`hrnet serve --workers`, SO_REUSEPORT) has the kernel spread *connections* over them, so two
load processes with one connection each left one front end idle in half the runs (the other
took every request), as a fleet of clients would not.

- **Closed loop** (`concurrency`): that many callers, each with one request in flight, as a
  thread pool of clients would send. Throughput is what the server sustains.
- **Open loop** (`rate`): requests arrive at Poisson times whatever the server does, as
  independent users would. Latency runs from the scheduled arrival, not the actual send, so a
  generator or server that falls behind shows up in the latency instead of hiding (no
  coordinated omission).

Every level starts in all workers at the same monotonic instant (the clock is system-wide),
runs a warm-up, then measures for a fixed duration (requests completing inside the window) or
a fixed count (the first N requests started after the warm-up). Latency percentiles are over
successful requests; failures are counted by gRPC status.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import os
import signal
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Protocol

import grpc
import numpy as np

from benchmarks.latency import LatencySummary
from benchmarks.protocol import Api
from benchmarks.protocol import api as make_api

START_LEAD_S = 0.3  # every worker has its command before the level starts
MAX_OUTSTANDING = 10_000  # open loop, per worker: arrivals beyond it are counted NOT_SENT
STOP_TIMEOUT_S = 10.0
MESSAGE_BYTES = 256 << 20
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MESSAGE_BYTES),
)
NOT_SENT = "NOT_SENT"


@dataclass(frozen=True)
class Workload:
    """What every request of a target looks like; `requests` are cycled."""

    api: str  # protocol.KSERVE or protocol.CLASSIFIER
    streaming: bool  # one bidirectional stream per worker instead of unary calls
    requests: tuple[bytes, ...]
    images_per_request: int
    timeout_s: float = 60.0  # per request: a stuck server fails requests, never hangs the run
    connections: int = 8  # per load process; callers take them in turn (streaming: the first)

    def __post_init__(self) -> None:
        if self.connections < 1:
            raise ValueError(f"a workload needs at least one connection, got {self.connections}")


@dataclass(frozen=True)
class Level:
    """One point of a sweep: closed loop at `concurrency` or open loop at `rate` requests/s."""

    concurrency: int = 0
    rate: float = 0.0
    warmup_s: float = 2.0
    duration_s: float = 10.0
    requests: int = 0  # > 0: measure this many requests instead of `duration_s`

    def __post_init__(self) -> None:
        if (self.concurrency > 0) == (self.rate > 0):
            raise ValueError("a level is either closed loop (concurrency > 0) or open loop (rate > 0)")
        if self.warmup_s < 0 or (self.requests <= 0 and self.duration_s <= 0):
            raise ValueError("need warmup_s >= 0 and a positive duration_s or requests")

    @property
    def label(self) -> str:
        n = self.concurrency
        return f"{n} caller{'s' if n != 1 else ''}" if n else f"{self.rate:g} req/s"


def in_turn(items: Sequence[Any], turn: int) -> list[Any]:
    """`items` in order on even turns, reversed on odd ones (A B, B A, A B, ...): a drift of the
    machine during a run falls on every setting alike, and none is always measured first or
    right after another (`benchmarks/paired.py` swaps its pairs the same way)."""
    return list(items) if turn % 2 == 0 else list(reversed(items))


class Probe(Protocol):
    """Something read at the start and the end of the measured window (a server's statistics)."""

    def start(self) -> None: ...

    def stop(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Measured:
    level: Level
    ok: int
    errors: dict[str, int]  # by gRPC status name; NOT_SENT: open-loop arrivals the generator dropped
    window_s: float
    images_per_request: int
    latency: LatencySummary | None
    loadgen_cpu: float  # CPU cores the generator's processes used over the window
    server: dict[str, Any] = field(default_factory=dict)  # what the probes read

    @property
    def req_s(self) -> float:
        return self.ok / self.window_s if self.window_s > 0 else 0.0

    @property
    def img_s(self) -> float:
        return self.req_s * self.images_per_request


def split(total: int, parts: int) -> list[int]:
    """`total` shared as evenly as possible, the larger shares first."""
    return [total // parts + (i < total % parts) for i in range(parts)]


class LoadGenerator:
    """`workers` processes driving registered targets, one level at a time."""

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        context = multiprocessing.get_context("spawn")  # no forked gRPC state
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        self._images_per_request: dict[str, int] = {}
        try:
            for index in range(workers):
                ours, theirs = context.Pipe()
                proc = context.Process(
                    target=_worker_main,
                    args=(theirs, index, workers),
                    name=f"hrnet-loadgen-{index}",
                    daemon=True,
                )
                proc.start()
                theirs.close()
                self._conns.append(ours)
                self._procs.append(proc)
            self._collect()  # every worker is up
        except BaseException:
            self.close()
            raise

    @property
    def workers(self) -> int:
        return len(self._procs)

    @property
    def pids(self) -> list[int]:
        """The worker processes, for what watches them from outside (their sockets, their CPU)."""
        return [proc.pid for proc in self._procs if proc.pid is not None]

    def add_target(self, key: str, address: str, workload: Workload) -> None:
        """Open the workload's connections to `address` in every worker; `workload` travels to them once."""
        for conn in self._conns:
            conn.send(("target", key, address, workload))
        self._collect()
        self._images_per_request[key] = workload.images_per_request

    def run(self, key: str, level: Level, probes: Sequence[Probe] = ()) -> Measured:
        start = time.monotonic() + START_LEAD_S
        for conn in self._conns:
            conn.send(("run", key, level, start))
        window_start = start + level.warmup_s
        _sleep_until(window_start)
        for probe in probes:
            probe.start()
        server: dict[str, Any] = {}
        if not level.requests:
            _sleep_until(window_start + level.duration_s)
            server = _stop(probes)
        samples: list[_Samples] = self._collect()
        if level.requests:
            server = _stop(probes)
        return _merge(level, samples, window_start, self._images_per_request[key], server)

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):  # a worker that died has closed its end
                conn.send(("stop",))
        for proc in self._procs:
            proc.join(STOP_TIMEOUT_S)
            if proc.is_alive():
                proc.terminate()
                proc.join(STOP_TIMEOUT_S)
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _collect(self) -> list[Any]:
        results = []
        for index, conn in enumerate(self._conns):
            try:
                status, value = conn.recv()
            except EOFError:
                raise RuntimeError(f"load generator worker {index} died") from None
            if status == "error":
                raise RuntimeError(f"load generator worker {index} failed:\n{value}")
            results.append(value)
        return results


def _sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _stop(probes: Sequence[Probe]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for probe in probes:
        figures.update(probe.stop())
    return figures


@dataclass
class _Samples:
    """One worker's measured requests of one level."""

    latencies_s: list[float] = field(default_factory=list)  # successful requests
    codes: Counter[str] = field(default_factory=Counter)  # every measured request, OK included
    cpu_s: float = 0.0
    window_end: float = 0.0  # count mode: when its last measured request completed


def _merge(
    level: Level,
    samples: list[_Samples],
    window_start: float,
    images_per_request: int,
    server: dict[str, Any],
) -> Measured:
    codes: Counter[str] = Counter()
    for s in samples:
        codes.update(s.codes)
    ok = codes.pop("OK", 0)
    if level.requests:
        window_s = max((s.window_end for s in samples), default=window_start) - window_start
    else:
        window_s = level.duration_s
    latencies = np.concatenate([np.asarray(s.latencies_s) for s in samples]) if samples else np.empty(0)
    return Measured(
        level=level,
        ok=ok,
        errors=dict(sorted(codes.items())),
        window_s=window_s,
        images_per_request=images_per_request,
        latency=LatencySummary.of(latencies),
        loadgen_cpu=sum(s.cpu_s for s in samples) / window_s if window_s > 0 else 0.0,
        server=server,
    )


# --- inside a worker process ----------------------------------------------------------------


Call = Callable[[bytes], Awaitable[str]]  # sends one request, returns its status name


def _worker_main(conn: Connection, index: int, workers: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    worker = _Worker(index, workers)
    conn.send(("ok", os.getpid()))
    try:
        while True:
            message = conn.recv()
            if message[0] == "stop":
                break
            try:
                conn.send(("ok", loop.run_until_complete(worker.handle(*message))))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        loop.run_until_complete(worker.close())
        loop.close()


class _Worker:
    def __init__(self, index: int, workers: int) -> None:
        self.index = index
        self.workers = workers
        self.targets: dict[str, tuple[list[grpc.aio.Channel], Workload]] = {}

    async def handle(self, kind: str, key: str, *args: Any) -> Any:
        if kind == "target":
            address, workload = args
            # A local subchannel pool each: channels of equal options would share one connection.
            options = (*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1))
            channels = [
                grpc.aio.insecure_channel(address, options=options) for _ in range(workload.connections)
            ]
            self.targets[key] = (channels, workload)
            await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), 30)
            return None
        if kind == "run":
            level, start = args
            channels, workload = self.targets[key]
            return await self.run(channels, workload, level, start)
        raise ValueError(f"unknown command {kind!r}")

    async def close(self) -> None:
        for channels, _ in self.targets.values():
            for channel in channels:
                await channel.close()

    async def run(
        self, channels: list[grpc.aio.Channel], workload: Workload, level: Level, start: float
    ) -> _Samples:
        window = _Window(start + level.warmup_s, level)
        if level.concurrency:
            callers = split(level.concurrency, self.workers)[self.index]
            active = min(level.concurrency, self.workers)
            window.quota = split(level.requests, active)[self.index] if callers else 0
        else:
            callers = 0
            window.quota = split(level.requests, self.workers)[self.index]
        if level.concurrency and not callers:
            return window.samples
        api = make_api(workload.api)
        stream = _Stream(channels[0], api, workload.timeout_s) if workload.streaming else None
        calls: list[Call] = (
            [stream.send] if stream else [_unary(c, api.unary, workload.timeout_s) for c in channels]
        )
        payloads = workload.requests
        cpu_watch = asyncio.ensure_future(window.watch_cpu())
        await _sleep_until_async(start)
        try:
            if level.concurrency:
                await asyncio.gather(
                    *(_caller(calls[k % len(calls)], payloads, k, callers, window) for k in range(callers))
                )
            else:
                rng = np.random.default_rng([self.index, int(level.rate * 1000)])
                await _arrivals(calls, payloads, level.rate / self.workers, rng, window)
            if not window.count_mode:
                await cpu_watch  # ends with the window, which has passed or is about to
        finally:
            cpu_watch.cancel()
            if stream:
                await stream.close()
        return window.samples


class _Window:
    """Which requests a worker measures, and its CPU time over them."""

    def __init__(self, start: float, level: Level) -> None:
        self.start = start
        self.count_mode = level.requests > 0
        self.end = float("inf") if self.count_mode else start + level.duration_s
        self.quota = 0  # count mode: measured requests still to send
        self.samples = _Samples()
        self._cpu_start: float | None = None

    async def watch_cpu(self) -> None:
        """CPU time from the window's start to its end (duration mode) or last measured completion."""
        await _sleep_until_async(self.start)
        self._cpu_start = time.process_time()
        if not self.count_mode:
            await _sleep_until_async(self.end)
            self.samples.cpu_s = time.process_time() - self._cpu_start

    def sending(self) -> bool:
        """Whether another request may be sent now; False once the measurement is over."""
        if self.count_mode:
            return self.quota > 0 or time.monotonic() < self.start
        return time.monotonic() < self.end

    def ticket(self, sent_at: float) -> bool:
        """Count mode: the first `quota` requests sent after the warm-up are the measured ones."""
        if not self.count_mode or sent_at < self.start or self.quota <= 0:
            return False
        self.quota -= 1
        return True

    def record(self, began: float, ended: float, code: str, ticket: bool) -> None:
        measured = ticket if self.count_mode else self.start <= ended < self.end
        if not measured:
            return
        self.samples.codes[code] += 1
        if code == "OK":
            self.samples.latencies_s.append(ended - began)
        if self.count_mode:
            self.samples.window_end = max(self.samples.window_end, ended)
            if self._cpu_start is not None:
                self.samples.cpu_s = time.process_time() - self._cpu_start


async def _sleep_until_async(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _caller(call: Call, payloads: tuple[bytes, ...], first: int, step: int, window: _Window) -> None:
    for i in itertools.count(first, step):
        if not window.sending():
            return
        began = time.monotonic()
        ticket = window.ticket(began)
        if window.count_mode and began >= window.start and not ticket:
            return
        code = await call(payloads[i % len(payloads)])
        window.record(began, time.monotonic(), code, ticket)


async def _arrivals(
    calls: list[Call], payloads: tuple[bytes, ...], rate: float, rng: np.random.Generator, window: _Window
) -> None:
    """Poisson arrivals at `rate`: independent exponential gaps, each request its own task, the
    connections taken in turn."""
    pending: set[asyncio.Task] = set()

    async def one(call: Call, payload: bytes, scheduled: float, ticket: bool) -> None:
        code = await call(payload)
        window.record(scheduled, time.monotonic(), code, ticket)

    scheduled = time.monotonic()
    for i in itertools.count():
        scheduled += rng.exponential(1.0 / rate)
        if scheduled >= window.end:
            break
        await _sleep_until_async(scheduled)
        if not window.sending():
            break
        ticket = window.ticket(scheduled)
        if window.count_mode and scheduled >= window.start and not ticket:
            break
        if len(pending) >= MAX_OUTSTANDING:
            window.record(scheduled, scheduled, NOT_SENT, ticket)
            continue
        task = asyncio.ensure_future(
            one(calls[i % len(calls)], payloads[i % len(payloads)], scheduled, ticket)
        )
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.gather(*pending)


def _unary(channel: grpc.aio.Channel, method: str, timeout_s: float) -> Call:
    stub = channel.unary_unary(method)  # bytes in, bytes out: nothing is (de)serialized per call

    async def call(payload: bytes) -> str:
        try:
            await stub(payload, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return "OK"

    return call


class _Stream:
    """One bidirectional stream carrying many requests, matched to their responses by id."""

    def __init__(self, channel: grpc.aio.Channel, api: Api, timeout_s: float) -> None:
        self.api = api
        self.timeout_s = timeout_s
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.pending: dict[str, asyncio.Future[str]] = {}
        self.ids = itertools.count()
        self.failure = ""
        self.call = channel.stream_stream(api.stream)(self._requests())
        self.reader = asyncio.ensure_future(self._read())

    async def _requests(self) -> Any:
        while (item := await self.queue.get()) is not None:
            yield item

    async def _read(self) -> None:
        failure = "UNAVAILABLE"  # the server ended the stream with requests unanswered
        try:
            async for response in self.call:
                request_id, code = self.api.stream_outcome(response)
                future = self.pending.pop(request_id, None)
                if future is not None and not future.done():
                    future.set_result(code)
        except grpc.aio.AioRpcError as exc:
            failure = exc.code().name
        except asyncio.CancelledError:
            failure = "CANCELLED"
        self.failure = failure
        for future in self.pending.values():
            if not future.done():
                future.set_result(failure)
        self.pending.clear()

    async def send(self, payload: bytes) -> str:
        if self.failure:
            return self.failure
        request_id = str(next(self.ids))
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        self.queue.put_nowait(self.api.with_id(payload, request_id))
        try:
            return await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            self.pending.pop(request_id, None)
            return "DEADLINE_EXCEEDED"

    async def close(self) -> None:
        self.queue.put_nowait(None)
        try:
            await asyncio.wait_for(self.reader, STOP_TIMEOUT_S)
        except TimeoutError:
            self.call.cancel()
