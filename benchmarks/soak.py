"""Overload soak: a real `hrnet serve` driven at twice its measured capacity, and what must hold.

    hrnet bench soak --model model.onnx [--duration 300] [--load 2.0] [--json FILE]

First the capacity is measured: `--concurrency` closed-loop callers for `--capacity-seconds`.
Then requests arrive open-loop (Poisson) at `--load` times that rate for `--duration` seconds,
half preprocessed FP32 tensors and half encoded PNG images (`--image-share`), each with a random
deadline in `--deadline-ms` and one in ten (`--cancel-share`) cancelled by the client after a
random delay. Checked at the end (and printed, exit 1 when one fails):

- every request ended exactly once, as OK, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED or CANCELLED;
- the server's counters (`hrnet_requests_total`) add up to the client's: each server ending is
  one of the four, the server has every OK and RESOURCE_EXHAUSTED the client saw, and what else
  it counted (or did not see at all) is accounted for by requests the client gave up on;
- the queue and the in-flight gauge are back to zero;
- resident memory at the end is within 10% of what it was after the warm-up (first fifth);
- the p99 latency of accepted (OK) requests stays under `--p99-bound-ms` (default: the longest
  deadline, 2 s).

It drives the server with its own asyncio generator rather than `benchmarks/loadgen.py`, whose
requests carry neither per-request deadlines nor client cancellations, and which counts by
level rather than following each request to its one ending. Traffic goes to 127.0.0.1 only and
is bounded in time and in requests outstanding.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import re
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from core.errors import CommandError
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from serving.engine.repository import default_model_name
from serving.process import ServerProcess, free_port

ENDINGS = ("OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED")
RSS_GROWTH_LIMIT = 0.10


@dataclass(frozen=True)
class SoakConfig:
    model: Path
    duration_s: float = 300.0
    load: float = 2.0  # offered rate as a multiple of the measured capacity
    capacity_s: float = 10.0
    concurrency: int = 16  # closed-loop callers while measuring capacity
    image_share: float = 0.5
    cancel_share: float = 0.1
    deadline_ms: tuple[float, float] = (50.0, 2000.0)
    p99_bound_ms: float = 2000.0  # the longest deadline: accepted requests never wait past theirs
    max_outstanding: int = 1024
    connections: int = 8  # clients, each on its own connection (a server holds 256 calls per connection)
    seed: int = 0
    server_args: tuple[str, ...] = ()


@dataclass
class SoakResult:
    capacity_rps: float
    offered_rps: float
    seconds: float
    sent: int
    client: dict[str, int]
    unexpected: dict[str, str]  # code -> the first message, for endings other than ENDINGS
    server: dict[str, int]
    queue_after: float
    in_flight_after: float
    rss_start_mb: float
    rss_warm_mb: float
    rss_end_mb: float
    rss_peak_mb: float
    p50_ms: float
    p99_ms: float
    limits: dict[str, float] = field(default_factory=dict)

    @property
    def gave_up(self) -> int:
        """Requests the client stopped waiting for: the server may have answered them anyway, or
        never seen them (cancelled before they arrived)."""
        return self.client.get("DEADLINE_EXCEEDED", 0) + self.client.get("CANCELLED", 0)

    @property
    def answered_late(self) -> int:
        """Requests the server answered (OK or RESOURCE_EXHAUSTED) after the client had given up."""
        return sum(
            max(0, self.server.get(c, 0) - self.client.get(c, 0)) for c in ("OK", "RESOURCE_EXHAUSTED")
        )

    def failures(self) -> list[str]:
        """The properties that did not hold, in words; empty when the soak passed."""
        failed = []
        ended = sum(self.client.values())
        if ended != self.sent:
            failed.append(f"{self.sent} requests sent but {ended} ended")
        unexpected = {code: n for code, n in self.client.items() if code not in ENDINGS}
        if unexpected:
            failed.append(f"unexpected endings: {unexpected}, e.g. {self.unexpected}")
        for code in ("OK", "RESOURCE_EXHAUSTED"):  # the server may have answered as the client gave up
            if self.client.get(code, 0) > self.server.get(code, 0):
                failed.append(
                    f"{code}: client {self.client.get(code, 0)} > server {self.server.get(code, 0)}"
                )
        odd = {code: n for code, n in self.server.items() if code not in ENDINGS}
        if odd:
            failed.append(f"the server ended requests with {odd}")
        seen = sum(self.server.values())
        if not ended - self.gave_up <= seen <= ended:
            failed.append(
                f"the server counted {seen} requests; the client sent {ended}, gave up on {self.gave_up}"
            )
        if self.queue_after or self.in_flight_after:
            failed.append(
                f"after the soak: queue {self.queue_after} images, {self.in_flight_after} in flight"
            )
        if self.rss_end_mb > (1 + RSS_GROWTH_LIMIT) * self.rss_warm_mb:
            failed.append(f"resident memory grew from {self.rss_warm_mb:.0f} to {self.rss_end_mb:.0f} MB")
        if self.p99_ms > self.limits["p99_bound_ms"]:
            failed.append(
                f"p99 of accepted requests {self.p99_ms:.0f} ms > {self.limits['p99_bound_ms']:.0f} ms"
            )
        if not self.client.get("OK"):
            failed.append("no request succeeded")
        return failed


class Payloads:
    """The two kinds of request the soak mixes, built once."""

    def __init__(self, model: str, input_name: str, shape: list[int], rng: np.random.Generator) -> None:
        tensor = rng.normal(0, 1, [1, *shape]).astype(np.float32)
        self.tensor = pb.ModelInferRequest(model_name=model)
        self.tensor.inputs.add(name=input_name, datatype="FP32", shape=[1, *shape])
        self.tensor.raw_input_contents.append(tensor.tobytes())
        pixels = rng.integers(0, 256, (shape[1] * 2, shape[2] * 2, 3), np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        png = buffer.getvalue()
        self.image = pb.ModelInferRequest(model_name=model)
        self.image.inputs.add(name=input_name, datatype="BYTES", shape=[1])
        self.image.raw_input_contents.append(len(png).to_bytes(4, "little") + png)


async def _one(
    stub: pb_grpc.GRPCInferenceServiceStub,
    request: pb.ModelInferRequest,
    deadline_s: float,
    cancel_after_s: float | None,
) -> tuple[str, str, float]:
    """One request's ending, its message and latency: one of ENDINGS (or an unexpected code)."""
    started = time.perf_counter()
    call = stub.ModelInfer(request, timeout=deadline_s)
    if cancel_after_s is not None:
        asyncio.get_running_loop().call_later(cancel_after_s, call.cancel)
    message = ""
    try:
        await call
        code = "OK"
    except grpc.aio.AioRpcError as exc:
        code, message = exc.code().name, exc.details() or ""
    except asyncio.CancelledError:  # grpc.aio raises this for a call the client cancelled
        code = "CANCELLED"
    return code, message, time.perf_counter() - started


async def _capacity(stub: pb_grpc.GRPCInferenceServiceStub, payloads: Payloads, cfg: SoakConfig) -> float:
    """Requests per second that `concurrency` closed-loop callers get through, the same mix."""
    rng = np.random.default_rng(cfg.seed)
    done = 0
    end = time.monotonic() + cfg.capacity_s

    async def caller() -> None:
        nonlocal done
        while time.monotonic() < end:
            request = payloads.image if rng.random() < cfg.image_share else payloads.tensor
            await stub.ModelInfer(request, timeout=30)
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(caller() for _ in range(cfg.concurrency)))
    return done / (time.monotonic() - started)


async def _soak(server: ServerProcess, cfg: SoakConfig, metrics_port: int) -> SoakResult:
    model = default_model_name(cfg.model)
    # Distinct channel arguments keep gRPC from sharing one connection between the channels.
    channels = [
        grpc.aio.insecure_channel(server.address, options=[("hrnet.soak_client", i)])
        for i in range(cfg.connections)
    ]
    try:
        return await _drive(server, cfg, metrics_port, model, channels)
    finally:
        for channel in channels:
            await channel.close()


async def _drive(
    server: ServerProcess, cfg: SoakConfig, metrics_port: int, model: str, channels: list[grpc.aio.Channel]
) -> SoakResult:
    stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in channels]
    stub = stubs[0]
    meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name=model))
    rng = np.random.default_rng(cfg.seed)
    payloads = Payloads(model, meta.inputs[0].name, list(meta.inputs[0].shape[1:]), rng)
    rss_start = server.rss_bytes()
    capacity = await _capacity(stub, payloads, cfg)
    rate = cfg.load * capacity
    before = _requests_by_code(metrics_port)
    endings: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}  # the first message of each unexpected ending
    latencies: list[float] = []
    tasks: set[asyncio.Task[None]] = set()
    rss_warm = rss_peak = 0
    sent = 0

    async def record(
        client: pb_grpc.GRPCInferenceServiceStub,
        request: pb.ModelInferRequest,
        deadline_s: float,
        cancel_s: float | None,
    ) -> None:
        code, message, seconds = await _one(client, request, deadline_s, cancel_s)
        endings[code] += 1
        if code not in ENDINGS:
            examples.setdefault(code, message)
        if code == "OK":
            latencies.append(seconds)

    started = time.monotonic()
    next_arrival = started
    warmed = False
    low, high = (ms / 1000 for ms in cfg.deadline_ms)
    while (now := time.monotonic()) < started + cfg.duration_s:
        if not warmed and now - started >= cfg.duration_s / 5:
            warmed, rss_warm = True, server.rss_bytes()
        rss_peak = max(rss_peak, server.rss_bytes()) if sent % 200 == 0 else rss_peak
        next_arrival += rng.exponential(1 / rate)
        await asyncio.sleep(max(0.0, next_arrival - time.monotonic()))
        if len(tasks) >= cfg.max_outstanding:
            continue  # the client itself is saturated: skip this arrival rather than queue it here
        deadline_s = float(rng.uniform(low, high))
        cancel_s = float(rng.uniform(0, deadline_s)) if rng.random() < cfg.cancel_share else None
        request = payloads.image if rng.random() < cfg.image_share else payloads.tensor
        task = asyncio.create_task(record(stubs[sent % len(stubs)], request, deadline_s, cancel_s))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        sent += 1
    if tasks:
        await asyncio.wait(set(tasks))
    seconds = time.monotonic() - started
    await asyncio.sleep(1.5)  # let the server settle: gauges drop, the heap is trimmed when quiet
    after = _requests_by_code(metrics_port)
    text = _metrics_text(metrics_port)
    ok = np.array(latencies) * 1000 if latencies else np.zeros(1)
    mb = 1 << 20
    return SoakResult(
        capacity_rps=capacity,
        offered_rps=rate,
        seconds=seconds,
        sent=sent,
        client=dict(endings),
        unexpected=examples,
        server={
            code: after[code] - before.get(code, 0) for code in after if after[code] - before.get(code, 0)
        },
        queue_after=_sample_sum(text, "hrnet_queue_depth_images"),
        in_flight_after=_sample_sum(text, "hrnet_in_flight_requests"),
        rss_start_mb=rss_start / mb,
        rss_warm_mb=rss_warm / mb,
        rss_end_mb=server.rss_bytes() / mb,
        rss_peak_mb=max(rss_peak, rss_warm) / mb,
        p50_ms=float(np.percentile(ok, 50)),
        p99_ms=float(np.percentile(ok, 99)),
        limits={"p99_bound_ms": cfg.p99_bound_ms},
    )


def _metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def _sample_sum(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def _requests_by_code(port: int) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for line in _metrics_text(port).splitlines():
        if line.startswith("hrnet_requests_total{"):
            code = re.search(r'code="([A-Z_]+)"', line)
            if code:
                counts[code.group(1)] += int(float(line.rsplit(" ", 1)[1]))
    return counts


def run_soak(cfg: SoakConfig, log_path: Path | None = None) -> SoakResult:
    """Start `hrnet serve` for `cfg.model`, soak it, stop it; the figures and what held."""
    metrics_port = free_port()
    args = ["--model", str(cfg.model), "--metrics-port", str(metrics_port), *cfg.server_args]
    with ServerProcess(args, log_path=log_path) as server:
        return asyncio.run(_soak(server, cfg, metrics_port))


def report(result: SoakResult) -> str:
    client = ", ".join(f"{code} {n}" for code, n in sorted(result.client.items()))
    server = ", ".join(f"{code} {n}" for code, n in sorted(result.server.items()))
    failures = result.failures()
    lines = [
        f"capacity {result.capacity_rps:.1f} req/s; offered {result.offered_rps:.1f} req/s "
        f"for {result.seconds:.0f} s",
        f"requests {result.sent}: client {client}",
        f"server counted: {server} ({result.answered_late} answered as the client gave up)",
        f"accepted latency p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms",
        f"resident memory: start {result.rss_start_mb:.0f} MB, after warm-up {result.rss_warm_mb:.0f} MB, "
        f"peak {result.rss_peak_mb:.0f} MB, end {result.rss_end_mb:.0f} MB",
        f"after: queue {result.queue_after:.0f} images, in flight {result.in_flight_after:.0f}",
        "all properties held" if not failures else "FAILED: " + "; ".join(failures),
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """`hrnet bench soak`: print the figures; exit 1 when a property did not hold."""
    if not args.model.is_file():
        raise CommandError(f"model file {args.model} does not exist")
    cfg = SoakConfig(
        model=args.model,
        duration_s=args.duration,
        load=args.load,
        capacity_s=args.capacity_seconds,
        image_share=args.image_share,
        cancel_share=args.cancel_share,
        deadline_ms=tuple(args.deadline_ms),
        p99_bound_ms=args.p99_bound_ms,
    )
    result = run_soak(cfg)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return 1 if result.failures() else 0
