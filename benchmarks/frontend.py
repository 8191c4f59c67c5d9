"""The multi-process front end against one process, in one run, and where the CPU time goes.

    python -m benchmarks.frontend --model model.onnx [--workers 1,2] [--concurrency 16]
        [--requests 800] [--repeats 3] [--payload fp32|uint8|jpeg] [--flags "--max-batch-size 16"]

For each `--workers` value (alternating, `--repeats` times, so a shared machine's background load
falls on all of them) it starts `hrnet serve --workers W` on 127.0.0.1 and drives it with
`--concurrency` callers, each on its own connection (the kernel balances connections over the
front-end processes, not calls), each sending one image per ModelInfer: a preprocessed FP32
tensor, UINT8 pixels, or a JPEG (sklearn's 640x427 sample photograph, rotated a little for
each of 16 variants, quality 90). It prints img/s, p50/p99 latency, the mean executed batch,
and the CPU seconds each server process (the model owner, and the front ends together) spent
per request, read from /proc: that shows where the time goes. The load stays on 127.0.0.1 and is bounded by
`--requests`.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from serving.process import ServerProcess
from serving.repository import default_model_name

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Measurement:
    workers: int
    images: int
    seconds: float
    p50_ms: float
    p99_ms: float
    mean_batch: float
    owner_cpu_ms: float  # per request, the process holding the models
    frontend_cpu_ms: float  # per request, all front-end processes together

    @property
    def throughput(self) -> float:
        return self.images / self.seconds


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def payloads(kind: str, shape: list[int]) -> tuple[str, list[int], list[bytes]]:
    """(datatype, request shape, 16 distinct payloads) for one image per request."""
    rng = np.random.default_rng(0)
    size = shape[-1]
    if kind == "fp32":
        return (
            "FP32",
            [1, 3, size, size],
            [rng.normal(0, 1, (1, 3, size, size)).astype("<f4").tobytes() for _ in range(16)],
        )
    if kind == "uint8":
        return (
            "UINT8",
            [1, size, size, 3],
            [rng.integers(0, 256, (1, size, size, 3), np.uint8).tobytes() for _ in range(16)],
        )
    from sklearn.datasets import load_sample_images

    photo = Image.fromarray(load_sample_images().images[0])
    jpegs = []
    for i in range(16):
        buffer = io.BytesIO()
        photo.rotate(i * 7).save(buffer, "JPEG", quality=90)
        jpegs.append(len(buffer.getvalue()).to_bytes(4, "little") + buffer.getvalue())
    return "BYTES", [1], jpegs


async def drive(
    address: str, model: str, kind: str, concurrency: int, requests: int, pids: list[int]
) -> tuple:
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", 64 << 20)]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(concurrency)]
    try:
        stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
        meta = await stubs[0].ModelMetadata(pb.ModelMetadataRequest(name=model))
        datatype, shape, data = payloads(kind, list(meta.inputs[0].shape))

        def request(i: int) -> pb.ModelInferRequest:
            r = pb.ModelInferRequest(model_name=model)
            r.inputs.add(name=meta.inputs[0].name, datatype=datatype, shape=shape)
            r.raw_input_contents.append(data[i % len(data)])
            return r

        for stub in stubs:  # warm up: connections, sessions, threads
            await stub.ModelInfer(request(0))
        stats = pb.ModelStatisticsRequest(name=model)
        before = (await stubs[0].ModelStatistics(stats)).model_stats[0]
        cpu_before = [cpu_seconds(p) for p in pids]
        latencies: list[float] = []
        counter = iter(range(requests))

        async def caller(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
            for i in counter:
                start = time.perf_counter()
                await stub.ModelInfer(request(i))
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(caller(stub) for stub in stubs))
        elapsed = time.perf_counter() - start
        cpu = [cpu_seconds(p) - b for p, b in zip(pids, cpu_before, strict=True)]
        after = (await stubs[0].ModelStatistics(stats)).model_stats[0]
    finally:
        for channel in channels:
            await channel.close()
    mean_batch = (after.inference_count - before.inference_count) / max(
        1, after.execution_count - before.execution_count
    )
    return latencies, elapsed, mean_batch, cpu


def measure(
    model: Path, workers: int, kind: str, concurrency: int, requests: int, flags: list[str]
) -> Measurement:
    args = ["--model", model, "--metrics-port", "-1", "--workers", str(workers), *flags]
    with ServerProcess(args) as server:
        assert server.proc is not None
        pids = [server.proc.pid, *children(server.proc.pid)] if workers > 1 else [server.proc.pid]
        latencies, elapsed, mean_batch, cpu = asyncio.run(
            drive(server.address, default_model_name(model), kind, concurrency, requests, pids)
        )
    ms = np.array(latencies) * 1e3
    n = len(latencies)
    return Measurement(
        workers,
        n,
        elapsed,
        float(np.percentile(ms, 50)),
        float(np.percentile(ms, 99)),
        mean_batch,
        cpu[0] / n * 1e3,
        sum(cpu[1:]) / n * 1e3,
    )


def report(results: list[Measurement], kind: str, concurrency: int) -> str:
    lines = [
        f"{kind} requests, one image each, {concurrency} callers on {concurrency} connections",
        f"{'workers':>7} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} "
        f"{'owner CPU ms/req':>17} {'front-end CPU ms/req':>21}",
    ]
    for r in results:
        lines.append(
            f"{r.workers:>7} {r.throughput:>8.1f} {r.p50_ms:>8.1f} {r.p99_ms:>8.1f} {r.mean_batch:>6.1f} "
            f"{r.owner_cpu_ms:>17.2f} {r.frontend_cpu_ms:>21.2f}"
        )
    medians: dict[int, float] = {}
    for w in dict.fromkeys(r.workers for r in results):
        medians[w] = float(np.median([r.throughput for r in results if r.workers == w]))
        lines.append(f"median, workers {w}: {medians[w]:.1f} img/s")
    base = medians.get(1)
    for w, value in medians.items():
        if base and w != 1:
            lines.append(f"workers {w} / workers 1 (medians): {value / base:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.frontend", description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--workers", default="1,2", help="comma-separated front-end process counts")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=800)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--payload", choices=("fp32", "uint8", "jpeg"), default="fp32")
    parser.add_argument("--flags", default="", help="more `hrnet serve` flags, quoted as one string")
    args = parser.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    results = [
        measure(args.model, w, args.payload, args.concurrency, args.requests, shlex.split(args.flags))
        for _ in range(args.repeats)
        for w in counts
    ]
    print(report(results, args.payload, args.concurrency))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
