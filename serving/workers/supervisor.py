"""The model owner's side of the front-end processes (`--workers N`, N > 1; serving/workers/frontend.py).

Starts them (each with a socket pair and a memfd arena, on the server's port), feeds them the
catalog of models and shared-memory regions, and queues the requests they hand over. That is the
hot path, and it is kept to bookkeeping: the front end checked and converted each input already,
so a SUBMIT record (serving/workers/ipc.py) becomes one `DataPlane.enqueue` of the rows where they lie in
its arena, with no coroutine, no second check and no copy; when the batch is done the logits are
written into the request's block and its id joins the DONE records sent at the end of the loop
turn.
It notices a front end that dies (its link closes): the requests it had handed over are
cancelled, its arena released once the batcher is done with them, and a new one is started in
its place. On shutdown it tells them to stop taking requests and to hand over the ones they
accepted (drain), and once the data plane has answered those, to stop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.config import MiB, ServerConfig
from serving.engine.service import DataPlane
from serving.engine.shm import SharedMemoryRegistry
from serving.errors import ServingError, StartError, describe
from serving.metrics import ServerMetrics
from serving.workers import ipc
from serving.workers.ipc import Arena, Link, open_link

log = logging.getLogger(__name__)
START_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0  # beyond the grace period, before SIGKILL
RESTART_BACKOFF_S = (0.5, 30.0)  # first delay, cap
REAP_POLL_S = 0.02


@dataclass(eq=False)
class _FrontEnd:
    index: int
    process: subprocess.Popen | None  # None: a stand-in in this process (a benchmark's)
    arena: Arena
    link: Link | None = None
    listening: asyncio.Future[None] | None = None
    tasks: dict[int, Any] = field(default_factory=dict)  # request id -> DataPlane.enqueue's handle
    calls: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    requests: Any = None  # its hrnet_frontend_requests_total child


class FrontEnds:
    """`count` front-end processes serving `port`, handing their requests to `plane`."""

    def __init__(
        self,
        config: ServerConfig,
        count: int,
        plane: DataPlane,
        regions: SharedMemoryRegistry,
        metrics: ServerMetrics | None,
        owner_address: str,
    ) -> None:
        self.config = config
        self.count = count
        self.plane = plane
        self.regions = regions
        self.metrics = metrics
        self.owner_address = owner_address
        self.port = 0
        self._front_ends: dict[int, _FrontEnd] = {}
        self._seq = itertools.count()
        self._stopping = False
        self._published = False
        self._restarts: set[asyncio.Task[None]] = set()
        plane.watch_intake(self._hold_intake)

    def processes(self) -> dict[int, int]:
        """Each running front end's index -> its pid."""
        return {i: fe.process.pid for i, fe in self._front_ends.items() if fe.process is not None}

    def pids(self) -> list[int]:
        return [fe.process.pid for fe in self._front_ends.values() if fe.process is not None]

    async def start(self, port: int) -> None:
        """Start every front end and wait until each listens; a StartError (all stopped) otherwise."""
        self.port = port
        try:
            await asyncio.gather(*(self._start_one(i) for i in range(self.count)))
        except BaseException:
            await self.stop(0.0)
            raise

    async def _start_one(self, index: int) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        arena = Arena.create(self.config.frontend_buffer_mb * MiB, f"hrnet-frontend-{index}")
        command = [sys.executable, "-m", "serving.workers.frontend"]
        command += ["--link", str(child.fileno()), "--arena", str(arena.fd), "--index", str(index)]
        command += ["--event-loop", self.config.event_loop]
        with child:
            process = subprocess.Popen(command, pass_fds=(child.fileno(), arena.fd))
        fe = await self.attach(index, arena, parent, process)
        fe.link.send(ipc.Configure(self.config, self.owner_address, self.port, arena.size))
        assert fe.listening is not None
        try:
            await asyncio.wait_for(asyncio.shield(fe.listening), START_TIMEOUT_S)
        except TimeoutError:
            raise StartError(
                f"front-end process {index} did not start within {START_TIMEOUT_S:.0f} s"
            ) from None
        if self._published:  # a replacement: it needs what the others already have
            await asyncio.gather(
                self._call(fe, lambda seq: ipc.Catalog(seq, self._models())),
                self._call(fe, lambda seq: ipc.Regions(seq, self._regions())),
            )
        log.info("front end listening", extra={"worker": index, "pid": process.pid, "port": self.port})

    async def attach(
        self, index: int, arena: Arena, sock: socket.socket, process: subprocess.Popen | None = None
    ) -> _FrontEnd:
        """Take requests from the front end at the other end of `sock`, writing into `arena`.
        `hrnet bench overhead` attaches a stand-in (no process) to measure the owner alone."""
        fe = _FrontEnd(index, process, arena)
        if process is not None:  # a stand-in listens nowhere
            fe.listening = asyncio.get_running_loop().create_future()
        self._front_ends[index] = fe
        if self.metrics:
            fe.requests = self.metrics.frontend_requests.labels(str(index))
        fe.link = await open_link(
            sock,
            lambda kind, records: self._on_records(fe, kind, records),
            lambda message: self._on_control(fe, message),
            lambda: self._on_lost(fe),
        )
        return fe

    def _models(self) -> list[Any]:
        return [model.view() for model in self.plane.models]

    def _regions(self) -> list[tuple[str, str, int, int]]:
        return [(r.name, r.key, r.offset, r.byte_size) for r in self.regions.status()]

    async def publish_models(self) -> None:
        self._published = True
        models = self._models()
        await asyncio.gather(*(self._call(fe, lambda seq: ipc.Catalog(seq, models)) for fe in self._live()))

    async def publish_regions(self) -> None:
        """Every front end holds the new registry before the RPC that changed it returns."""
        regions = self._regions()
        await asyncio.gather(*(self._call(fe, lambda seq: ipc.Regions(seq, regions)) for fe in self._live()))

    async def drain(self, grace_s: float) -> bool:
        """Front ends refuse new requests and hand over what they accepted; True when all did."""
        self._stopping = True
        for task in self._restarts:
            task.cancel()
        calls = [self._call(fe, ipc.Drain, timeout_s=grace_s) for fe in self._live()]
        results = await asyncio.gather(*calls, return_exceptions=True)
        return not any(isinstance(r, BaseException) for r in results)

    async def stop(self, grace_s: float) -> None:
        """Stop every front end (they finish sending their responses within `grace_s`), then reap."""
        self._stopping = True
        for task in self._restarts:
            task.cancel()
        for fe in self._live():
            assert fe.link is not None
            fe.link.send(ipc.Stop(grace_s))
        await asyncio.gather(*(self._reap(fe, grace_s + STOP_TIMEOUT_S) for fe in self._front_ends.values()))

    def _hold_intake(self, hold: bool) -> None:
        """Leave the front ends' records unread while every batch waits for company anyway
        (DataPlane.watch_intake); read all that came at once when that ends."""
        for fe in self._live():
            assert fe.link is not None
            if hold:
                fe.link.pause_reading()
            else:
                fe.link.resume_reading()

    def _live(self) -> list[_FrontEnd]:
        return [fe for fe in self._front_ends.values() if fe.link is not None and not fe.link.closed]

    async def _call(
        self, fe: _FrontEnd, message: Callable[[int], Any], timeout_s: float = CALL_TIMEOUT_S
    ) -> None:
        """Send `message(seq)` and wait for the front end's Ack(seq)."""
        assert fe.link is not None
        seq = next(self._seq)
        done = asyncio.get_running_loop().create_future()
        fe.calls[seq] = done
        fe.link.send(message(seq))
        try:
            await asyncio.wait_for(done, timeout_s)
        finally:
            fe.calls.pop(seq, None)

    def _on_records(self, fe: _FrontEnd, kind: ipc.Kind, records: np.ndarray) -> None:
        if kind == ipc.Kind.SUBMIT:
            self._submit(fe, records)
        elif kind == ipc.Kind.CANCEL:
            for request_id, expired in records.tolist():
                handle = fe.tasks.get(request_id)
                if handle is not None:
                    self.plane.withdraw(handle, bool(expired))

    def _submit(self, fe: _FrontEnd, records: np.ndarray) -> None:
        """Queue every request of one SUBMIT frame: per request a lookup, the admission rule and a
        heap push. What fails is answered at once with its status."""
        if fe.requests is not None:
            fe.requests.inc(len(records))
        failed: list[tuple[int, str, str]] = []
        for request_id, slot, rows, offset, output, deadline, priority, arrived in records.tolist():
            try:
                model = self.plane.by_slot(slot)
                items = fe.arena.array(offset, (rows, *model.input_shape), model.input.dtype)
                fe.tasks[request_id] = self.plane.enqueue(
                    model,
                    items,
                    None if deadline != deadline else deadline,  # NaN: none
                    priority,
                    arrived,
                    self._done,
                    (fe, request_id, output, model.num_classes),
                )
            except ServingError as exc:
                failed.append((request_id, exc.code, str(exc)))
        if failed:
            assert fe.link is not None
            fe.link.send(ipc.Failed(failed))

    def _done(
        self, ref: tuple[_FrontEnd, int, int, int], logits: np.ndarray | None, error: BaseException | None
    ) -> None:
        """A request handed over ended: its logits into its block and its id into DONE, or its error."""
        fe, request_id, output, classes = ref
        fe.tasks.pop(request_id, None)
        assert fe.link is not None
        if error is None and logits is not None and logits.shape[1:] != (classes,):
            error = ServingError(f"the model returned logits of shape {list(logits.shape)}")
        if error is None and logits is not None:
            fe.arena.array(output, logits.shape, np.float32)[...] = logits
            fe.link.add(ipc.Kind.DONE, request_id)
            return
        if isinstance(error, asyncio.CancelledError):
            code, message = "CANCELLED", "cancelled by the server"
        else:
            code, message = describe(error) if error is not None else ("INTERNAL", "no logits")
        fe.link.send(ipc.Failed([(request_id, code, message)]))

    def _on_control(self, fe: _FrontEnd, message: Any) -> None:
        handler = {
            ipc.Ack: self._acked,
            ipc.Refused: self._refused,
            ipc.Listening: self._started,
            ipc.StartFailed: self._started,
        }[type(message)]
        handler(fe, message)

    @staticmethod
    def _acked(fe: _FrontEnd, message: ipc.Ack) -> None:
        done = fe.calls.get(message.seq)
        if done is not None and not done.done():
            done.set_result(None)

    def _refused(self, fe: _FrontEnd, message: ipc.Refused) -> None:
        self.plane.account(message.model, message.version, message.code, message.seconds)

    @staticmethod
    def _started(fe: _FrontEnd, message: ipc.Listening | ipc.StartFailed) -> None:
        if fe.listening is None or fe.listening.done():
            return
        if isinstance(message, ipc.StartFailed):
            fe.listening.set_exception(StartError(message.reason))
        else:
            fe.listening.set_result(None)

    def _on_lost(self, fe: _FrontEnd) -> None:
        if fe.listening is not None and not fe.listening.done():
            fe.listening.set_exception(StartError(f"front-end process {fe.index} exited during start"))
        for done in fe.calls.values():
            if not done.done():
                done.set_exception(ConnectionError(f"front-end process {fe.index} is gone"))
        for handle in list(fe.tasks.values()):
            self.plane.withdraw(handle, expired=False)  # running ones finish: the arena waits for them
        loop = asyncio.get_running_loop()
        if self._stopping or not self._published:
            return
        restart = loop.create_task(self._replace(fe))
        self._restarts.add(restart)
        restart.add_done_callback(self._restarts.discard)

    async def _replace(self, fe: _FrontEnd) -> None:
        """A front end died while serving: log it, count it, and start another in its place."""
        code = await self._reap(fe, STOP_TIMEOUT_S)
        log.error(
            "front end died; starting another",
            extra={"worker": fe.index, "pid": fe.process.pid if fe.process else None, "exit": code},
        )
        if self.metrics:
            self.metrics.frontend_restarts.inc()
        delay, cap = RESTART_BACKOFF_S
        while not self._stopping:
            try:
                await self._start_one(fe.index)
                return
            except (StartError, ConnectionError, OSError) as exc:
                log.error("front end restart failed", extra={"worker": fe.index, "error": str(exc)})
                await self._reap(self._front_ends[fe.index], STOP_TIMEOUT_S)
                await asyncio.sleep(delay)
                delay = min(cap, delay * 2)

    async def _reap(self, fe: _FrontEnd, timeout_s: float) -> int | None:
        """Wait for the process to exit (SIGKILL after `timeout_s`), then release its arena.

        Polled, not waited for on a thread: a stopped server leaves no thread behind.
        """
        deadline = time.monotonic() + timeout_s
        code = None
        while fe.process is not None and (code := fe.process.poll()) is None:
            if time.monotonic() > deadline:
                fe.process.kill()
                deadline = float("inf")
            await asyncio.sleep(REAP_POLL_S)
        while fe.tasks:  # the batcher may still read their rows: the arena waits for them
            await asyncio.sleep(REAP_POLL_S)
        if fe.link is not None:
            fe.link.close()
        fe.arena.close()
        return code
