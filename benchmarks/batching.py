"""Throughput and latency with and without dynamic batching, at a fixed client concurrency.

Starts a real `hrnet serve` process per setting on 127.0.0.1 (batching off: `max_batch_size`
1; on: the given size and delay), drives it with `concurrency` asyncio callers that each send
one preprocessed FP32 image per ModelInfer (raw bytes, so client-side serialization is
negligible) and reports img/s and latency percentiles. Load stays on 127.0.0.1 and is bounded
by `requests`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from serving.process import ServerProcess
from serving.repository import default_model_name


@dataclass(frozen=True)
class Measurement:
    setting: str
    images: int
    seconds: float
    p50_ms: float
    p99_ms: float
    mean_batch: float  # images per executed batch, from the server's ModelStatistics

    @property
    def throughput(self) -> float:
        return self.images / self.seconds


async def drive(
    address: str, model: str, concurrency: int, requests: int
) -> tuple[list[float], float, float]:
    """Send `requests` single-image requests from `concurrency` callers; latencies and batch stats."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name=model))
        shape = [1, *meta.inputs[0].shape[1:]]
        rng = np.random.default_rng(0)
        payloads = [rng.normal(0, 1, shape).astype(np.float32).tobytes() for _ in range(32)]

        def request(i: int) -> pb.ModelInferRequest:
            r = pb.ModelInferRequest(model_name=model)
            r.inputs.add(name=meta.inputs[0].name, datatype="FP32", shape=shape)
            r.raw_input_contents.append(payloads[i % len(payloads)])
            return r

        for i in range(concurrency):  # warm up: sessions, threads, connections
            await stub.ModelInfer(request(i))
        before = (await stub.ModelStatistics(pb.ModelStatisticsRequest(name=model))).model_stats[0]
        latencies: list[float] = []
        counter = iter(range(requests))

        async def caller() -> None:
            for i in counter:
                start = time.perf_counter()
                await stub.ModelInfer(request(i))
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        after = (await stub.ModelStatistics(pb.ModelStatisticsRequest(name=model))).model_stats[0]
        executions = after.execution_count - before.execution_count
        mean_batch = (after.inference_count - before.inference_count) / max(1, executions)
        return latencies, elapsed, mean_batch


def measure(model: Path, setting: str, flags: list[str], concurrency: int, requests: int) -> Measurement:
    with ServerProcess(["--model", model, "--metrics-port", "-1", *flags]) as server:
        latencies, elapsed, mean_batch = asyncio.run(
            drive(server.address, default_model_name(model), concurrency, requests)
        )
    ms = np.array(latencies) * 1e3
    return Measurement(
        setting,
        len(latencies),
        elapsed,
        float(np.percentile(ms, 50)),
        float(np.percentile(ms, 99)),
        mean_batch,
    )


def compare(
    model: Path,
    concurrency: int = 16,
    requests: int = 800,
    max_batch_size: int = 16,
    delay_us: int = 2000,
    repeats: int = 1,
) -> list[Measurement]:
    """The same load without batching (max_batch_size 1) and with it, alternated `repeats` times.

    Alternating the settings spreads a shared machine's background load over both.
    """
    off = ["--max-batch-size", "1", "--max-queue-delay-us", "0"]
    on = ["--max-batch-size", str(max_batch_size), "--max-queue-delay-us", str(delay_us)]
    results = []
    for _ in range(repeats):
        results.append(measure(model, "no batching", off, concurrency, requests))
        results.append(
            measure(model, f"batching {max_batch_size} / {delay_us} us", on, concurrency, requests)
        )
    return results


def report(results: list[Measurement], concurrency: int) -> str:
    lines = [
        f"concurrency {concurrency}, one image per request",
        f"{'setting':<28} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>11}",
    ]
    for r in results:
        lines.append(
            f"{r.setting:<28} {r.throughput:>8.1f} {r.p50_ms:>8.1f} {r.p99_ms:>8.1f} {r.mean_batch:>11.2f}"
        )
    by_setting: dict[str, list[float]] = {}
    for r in results:
        by_setting.setdefault(r.setting, []).append(r.throughput)
    medians = {name: float(np.median(values)) for name, values in by_setting.items()}
    lines += [f"median {name}: {value:.1f} img/s" for name, value in medians.items()]
    off, on = list(medians.values())[:2] if len(medians) == 2 else (0.0, 0.0)
    if off:
        lines.append(f"speed-up from batching (medians): {on / off:.2f}x")
    return "\n".join(lines)
