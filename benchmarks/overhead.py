"""`hrnet bench overhead`: what the server itself costs per request, process by process, thread by thread.

The model is made on the fly and is almost free (one 1x1 convolution whose stride is the image
size, so it reads 3 numbers per image), so everything measured is the server's own work. For each
payload (FP32 tensors, UINT8 pixels, JPEG photographs; one image per request) and each `hrnet serve
--workers` value, alternated `--repeats` times so a shared machine's drift falls on all of them, it
starts the server on 127.0.0.1, drives it from `--workers` load processes with `--concurrency`
callers, and reads from /proc the CPU time of every thread of the model owner and of every
front-end process over the measured window:

- owner: the event loop (its main thread), the model instances (`hrnet-instance`), the runtime's
  pool (`hrnet-pool`) and the rest (gRPC, the default executor);
- front ends together (and the busiest one's share of them: the kernel spreads connections, not
  requests, so a load of few connections can leave one idle), and the load generator.

Each is reported in CPU milliseconds per request. The owner's cap, 1000 / owner ms, is the request
rate one owner process could sustain if it had a core to itself: the figure that says whether the
owner, not the front ends or the accelerator, is the limit.

Through gRPC on a small machine the owner is rarely busy (the front ends and the load take the
cores), and a thread woken for every small batch pays for the wake-up each time. So the owner is
also measured alone (`--owner-alone`): in this process, fed by a stand-in front end (a thread on
the other end of the same socket link, writing SUBMIT records and reading DONE ids as fast as
they come, with a fixed number of requests in flight), which shows what one owner can carry when
there is work for it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import os
import shlex
import socket
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.loadgen import Level, LoadGenerator, Measured, Workload, in_turn
from benchmarks.machine import this_machine
from benchmarks.modes import command_line
from benchmarks.near_free import CLASSES, near_free_model
from benchmarks.protocol import KSERVE, fetch_model_info
from benchmarks.protocol import api as make_api
from benchmarks.report import Report
from benchmarks.targets import StatisticsProbe
from core.errors import CommandError
from serving import event_loop
from serving.config import EVENT_LOOPS
from serving.engine.backends.instance import OS_NAME_INSTANCE, OS_NAME_POOL
from serving.process import ServerProcess

PAYLOADS = ("fp32", "uint8", "jpeg")
ROLES = ("event_loop", "instances", "runtime_pool", "other_threads")
TICKS = os.sysconf("SC_CLK_TCK")
JPEG_SIZE = (500, 375)  # an ImageNet-like photograph
DISTINCT_REQUESTS = 16


def _jpegs(count: int) -> list[bytes]:
    """Smooth random colour fields at 500x375, quality 90: photographs' size and decode cost."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        small = rng.integers(0, 256, (12, 16, 3), np.uint8)
        image = Image.fromarray(small).resize(JPEG_SIZE, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def workload(payload: str, address: str, size: int) -> Workload:
    model = fetch_model_info(address)
    api = make_api(KSERVE)
    rng = np.random.default_rng(0)
    if payload == "fp32":
        requests = [
            api.tensor_request(model, rng.standard_normal((1, 3, size, size), dtype=np.float32))
            for _ in range(DISTINCT_REQUESTS)
        ]
    elif payload == "uint8":
        requests = [
            api.tensor_request(model, rng.integers(0, 256, (1, size, size, 3), np.uint8))
            for _ in range(DISTINCT_REQUESTS)
        ]
    else:
        requests = [api.images_request(model, [jpeg]) for jpeg in _jpegs(DISTINCT_REQUESTS)]
    return Workload(KSERVE, False, tuple(requests), 1)


def _threads(pid: int) -> dict[int, tuple[str, float]]:
    """Every thread of `pid`: (kernel name, CPU seconds so far)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            stat = (task / "stat").read_text()
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat.rsplit(")", 1)[1].split()
            out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / TICKS)
    return out


def _process_cpu_s(pid: int) -> float:
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS
    return 0.0


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def role(tid: int, pid: int, name: str) -> str:
    if tid == pid:
        return "event_loop"
    if name.startswith(OS_NAME_INSTANCE):
        return "instances"
    if name.startswith(OS_NAME_POOL):
        return "runtime_pool"
    return "other_threads"


class CpuSplitProbe:
    """CPU seconds over the window: the owner by thread role, and its front-end processes."""

    def __init__(self, owner: int) -> None:
        self.owner = owner
        self._threads: dict[int, tuple[str, float]] = {}
        self._front_ends: dict[int, float] = {}

    def start(self) -> None:
        self._threads = _threads(self.owner)
        self._front_ends = {pid: _process_cpu_s(pid) for pid in children(self.owner)}

    def stop(self) -> dict[str, Any]:
        split: dict[str, float] = defaultdict(float)
        for tid, (name, cpu_s) in _threads(self.owner).items():
            split[role(tid, self.owner, name)] += cpu_s - self._threads.get(tid, (name, 0.0))[1]
        each = [_process_cpu_s(pid) - before for pid, before in self._front_ends.items()]
        return {
            "owner_cpu_s": {r: split[r] for r in ROLES},
            "front_ends_cpu_s": sum(each),
            "front_end_processes": len(each),
            "busiest_front_end": max(each) / sum(each) if sum(each) > 0 else None,
        }


@dataclass(frozen=True)
class Row:
    payload: str
    serve_workers: int
    event_loop: str  # what the server ran on: uvloop or asyncio
    req_s: float
    errors: dict[str, int]
    p99_ms: float | None
    mean_batch: float | None
    owner_ms: dict[str, float]  # CPU ms per request by thread role
    front_ends_ms: float
    front_end_processes: int
    busiest_front_end: float | None  # its share of the front ends' CPU: 1/N when even
    loadgen_ms: float

    @property
    def owner_total_ms(self) -> float:
        return sum(self.owner_ms.values())

    def as_dict(self) -> dict[str, Any]:
        total = self.owner_total_ms
        return {
            "payload": self.payload,
            "serve_workers": self.serve_workers,
            "event_loop": self.event_loop,
            "req_s": self.req_s,
            "errors": self.errors,
            "p99_ms": self.p99_ms,
            "mean_batch": self.mean_batch,
            "owner_ms": self.owner_ms,
            "owner_total_ms": total,
            "owner_cap_req_s": 1000 / total if total > 0 else None,
            "front_ends_ms": self.front_ends_ms,
            "front_end_processes": self.front_end_processes,
            "busiest_front_end": self.busiest_front_end,
            "loadgen_ms": self.loadgen_ms,
            "server_ms": total + self.front_ends_ms,
        }


def _row(payload: str, serve_workers: int, loop: str, measured: Measured) -> Row:
    n = max(1, measured.ok)
    figures = measured.server
    return Row(
        payload=payload,
        serve_workers=serve_workers,
        event_loop=loop,
        req_s=measured.req_s,
        errors=measured.errors,
        p99_ms=measured.latency.p99_ms if measured.latency else None,
        mean_batch=figures.get("mean_batch"),
        owner_ms={r: 1e3 * s / n for r, s in figures.get("owner_cpu_s", {}).items()},
        front_ends_ms=1e3 * figures.get("front_ends_cpu_s", 0.0) / n,
        front_end_processes=figures.get("front_end_processes", 0),
        busiest_front_end=figures.get("busiest_front_end"),
        loadgen_ms=1e3 * measured.loadgen_cpu * measured.window_s / n,
    )


def measure(
    model: Path,
    payload: str,
    serve_workers: int,
    generator: LoadGenerator,
    level: Level,
    size: int,
    flags: list[str],
    loop: str = "auto",
) -> Row:
    args = ["--model", str(model), "--workers", str(serve_workers), "--metrics-port", "-1", *flags]
    args += ["--event-loop", loop]
    with ServerProcess([*args, "--log-format", "text"]) as server:
        assert server.proc is not None
        key = f"{payload}-{serve_workers}-{server.port}"
        generator.add_target(key, server.address, workload(payload, server.address, size))
        probes = [CpuSplitProbe(server.proc.pid), StatisticsProbe(server.address, "")]
        return _row(payload, serve_workers, event_loop.resolve(loop), generator.run(key, level, probes))


def summarize(rows: list[Row]) -> list[dict[str, Any]]:
    """Per (payload, serve_workers, event_loop): the median of the repeats, by req/s."""
    groups: dict[tuple[str, int, str], list[Row]] = defaultdict(list)
    for row in rows:
        groups[row.payload, row.serve_workers, row.event_loop].append(row)
    out = []
    for group in groups.values():
        group.sort(key=lambda r: r.req_s)
        median = group[len(group) // 2].as_dict()
        median["repeats"] = len(group)
        out.append(median)
    return out


def owner_alone(size: int, in_flight: int, requests: int, loop: str = "auto") -> dict[str, Any]:
    """The owner's CPU per request fed by a stand-in front end at full speed (see the docstring),
    on the event loop `loop` (serving.config.EVENT_LOOPS) as `hrnet serve` would run it."""
    result = event_loop.run(_owner_alone(size, in_flight, requests), loop)
    return {"event_loop": event_loop.resolve(loop), **result}


async def _owner_alone(size: int, in_flight: int, requests: int) -> dict[str, Any]:
    from serving.config import BatchingConfig, ModelConfig, ServerConfig
    from serving.engine.repository import ModelSource
    from serving.engine.service import DataPlane, load_model
    from serving.workers.ipc import Arena, aligned
    from serving.workers.supervisor import FrontEnds

    with tempfile.TemporaryDirectory(prefix="hrnet-owner-") as tmp:
        path = near_free_model(Path(tmp) / "model.onnx", size)
        config = ModelConfig(
            threads_per_instance=1, batching=BatchingConfig(max_batch_size=max(16, in_flight))
        )
        model = await asyncio.to_thread(
            load_model, ModelSource("m", "1", path, config), None, 1, 1 << 30, 1 << 30
        )
    plane = DataPlane()
    await plane.add(model)
    plane.open()
    owner = FrontEnds(ServerConfig(model=str(path)), 1, plane, None, None, "")  # type: ignore[arg-type]
    item = 3 * size * size * 4
    stride = aligned(max(item, CLASSES * 4))  # a front end's block: the logits overwrite the input
    arena = Arena.create(stride * in_flight, "hrnet-owner-alone")
    for slot in range(in_flight):
        arena.array(slot * stride, (1, 3, size, size), np.float32)[...] = 0.5
    ours, theirs = socket.socketpair()
    await owner.attach(0, arena, ours)
    finished = asyncio.get_running_loop().create_future()  # awaited, not polled: polls are loop CPU

    def feed() -> None:
        try:
            _stand_in(theirs, model.slot, in_flight, requests, stride)
        finally:
            finished.get_loop().call_soon_threadsafe(finished.set_result, None)

    before = _threads(os.getpid())
    started = time.perf_counter()
    stand_in = threading.Thread(target=feed)
    stand_in.start()
    await finished
    stand_in.join()
    seconds = time.perf_counter() - started
    split: dict[str, float] = defaultdict(float)
    for tid, (name, cpu_s) in _threads(os.getpid()).items():
        if tid == threading.get_native_id() or name.startswith((OS_NAME_INSTANCE, OS_NAME_POOL)):
            split[role(tid, threading.get_native_id(), name)] += cpu_s - before.get(tid, (name, 0.0))[1]
    stats = model.stats.snapshot()
    await plane.drain(5.0)
    plane.close()
    theirs.close()
    arena.close()
    owner_ms = {r: 1e3 * split[r] / requests for r in ("event_loop", "instances", "runtime_pool")}
    total = sum(owner_ms.values())
    return {
        "in_flight": in_flight,
        "req_s": requests / seconds,
        "mean_batch": stats.inference_count / max(1, stats.execution_count),
        "owner_ms": owner_ms,
        "owner_total_ms": total,
        "owner_cap_req_s": 1000 / total if total > 0 else None,
    }


def _stand_in(sock: socket.socket, slot: int, in_flight: int, requests: int, stride: int) -> None:
    """A front end reduced to its link: keeps `in_flight` records outstanding until `requests`."""
    from serving.workers.ipc import DONE, HEADER, SUBMIT, Kind

    def submit(ids: list[int]) -> None:
        now = time.monotonic()
        records = [
            (i, slot, 1, (i % in_flight) * stride, (i % in_flight) * stride, np.nan, 0, now) for i in ids
        ]
        body = np.array(records, SUBMIT).tobytes()
        sock.sendall(HEADER.pack(len(body), Kind.SUBMIT) + body)

    submit(list(range(min(in_flight, requests))))
    answered, buffer = 0, b""
    while answered < requests:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return
        buffer += chunk
        while len(buffer) >= HEADER.size:
            length, kind = HEADER.unpack_from(buffer)
            if len(buffer) < HEADER.size + length:
                break
            body, buffer = buffer[HEADER.size : HEADER.size + length], buffer[HEADER.size + length :]
            if kind != Kind.DONE:
                raise RuntimeError(f"the owner answered {Kind(kind).name}, not DONE")
            done = np.frombuffer(body, DONE).tolist()
            answered += len(done)
            fresh = [d + in_flight for d in done if d + in_flight < requests]  # each takes its block
            if fresh:
                submit(fresh)


def run(args: argparse.Namespace) -> Report:
    machine = this_machine()
    for payload in args.payloads:
        if payload not in PAYLOADS:
            raise CommandError(f"--payloads takes {', '.join(PAYLOADS)}; got {payload!r}")
    for loop in args.event_loops:
        if loop not in EVENT_LOOPS:
            raise CommandError(f"--event-loops takes {', '.join(EVENT_LOOPS)}; got {loop!r}")
    level = Level(concurrency=args.concurrency, warmup_s=args.warmup, duration_s=args.duration)
    rows: list[Row] = []
    flags = shlex.split(args.serve_args)
    with (
        tempfile.TemporaryDirectory(prefix="hrnet-overhead-") as tmp,
        LoadGenerator(args.workers) as generator,
    ):
        model = near_free_model(Path(tmp) / "near_free" / "model.onnx", args.size)
        settings = list(itertools.product(args.serve_workers, args.event_loops))
        for repeat in range(args.repeats):
            for payload in args.payloads:
                for serve_workers, loop in in_turn(settings, repeat):
                    row = measure(model, payload, serve_workers, generator, level, args.size, flags, loop)
                    rows.append(row)
                    print(
                        f"[{repeat + 1}/{args.repeats}] {payload} --workers {serve_workers} "
                        f"{row.event_loop}: {row.req_s:.0f} req/s, owner {row.owner_total_ms:.3f} ms/req",
                        file=sys.stderr,
                    )
    alone = [
        owner_alone(args.size, k, args.owner_requests, loop)
        for k in args.owner_alone
        for loop in args.event_loops
    ]
    document = {
        "owner_alone": alone,
        "concurrency": args.concurrency,
        "load_processes": args.workers,
        "size": args.size,
        "runs": [row.as_dict() for row in rows],
        "summary": summarize(rows),
    }
    workload_text = {
        "api": KSERVE,
        "input": f"{', '.join(args.payloads)} at {args.size} px (JPEG: {JPEG_SIZE[0]}x{JPEG_SIZE[1]})",
        "images_per_request": 1,
        "streaming": False,
        "workers": args.workers,
    }
    return Report(
        "overhead", machine, command_line(), args.note, workload=workload_text, extra={"overhead": document}
    )
