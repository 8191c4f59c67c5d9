"""Issue 11's figures in one prepared run: in-process ceiling, then the server, same run, same card.

    python -m benchmarks.gpu_serving prepare --out gpu-models    # W48 fp32 and fp16 ONNX (MindSpore)
    python -m benchmarks.gpu_serving run --model w48=gpu-models/w48.onnx \\
        --model w48-fp16=gpu-models/w48_fp16.onnx --device gpu --callers 64 --out /tmp/out

On the lent GPU machine (no package access, transfers of at most 64 MiB; ../shared/gpu/README.md):
here, `bash ../shared/gpu/prepare.sh` (onnxruntime-gpu in parts, wheels), `prepare` as above,
then `python ../shared/gpu/onnx_weights.py zero gpu-models/w48.onnx .gpu/w48.onnx.xz` and the
same for w48_fp16 (66 KiB each once zeroed); there, `bash .gpu/setup.sh stage K` for each part
but the last, then one call with the last part, .gpu/whl, .gpu/setup.sh, .gpu/onnx_weights.py
and both .xz files carried:

    source .gpu/setup.sh install \\
      && python3 .gpu/onnx_weights.py fill .gpu/w48.onnx.xz /tmp/w48.onnx \\
      && python3 .gpu/onnx_weights.py fill .gpu/w48_fp16.onnx.xz /tmp/w48_fp16.onnx \\
      && python3 -m benchmarks.gpu_serving run --model w48=/tmp/w48.onnx \\
           --model w48-fp16=/tmp/w48_fp16.onnx --budget-s 420 --out $OUT/gpu

For every model, in order, each section skipped (and said so) when the time budget is spent:
1. **ceiling**: the model through our own backend in this process on the instance's own thread,
   at every batch bucket: the first run of each shape (what warm-up pays) and the steady img/s.
   Also plain `InferenceSession.run` at the largest bucket (no IOBinding), for reference.
2. **raw**: `hrnet serve` on 127.0.0.1, `--callers` closed-loop callers sending one FP32 image
   per ModelInfer (serialized once, sent as bytes) from `--processes` generator processes, so
   the generator is not the cap: img/s, p50/p99, mean executed batch (ModelStatistics), the
   warm-up time the server reports, and the ratio to the ceiling at the largest bucket.
3. **jpeg**: the same with a 500x375 JPEG per request (BYTES, decoded by the server).

Results go to OUT/results.jsonl (one line per section as it finishes) and OUT/report.md; a
killed run keeps what it finished. `--server-flag` passes flags through to `hrnet serve`
(e.g. a front end's worker count). Rehearse on CPU with a small model and `--device cpu`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import multiprocessing
import os
import platform
import shlex
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc

INFER = "/inference.GRPCInferenceService/ModelInfer"
JPEG_SIZE = (500, 375)  # the issue's JPEG requests


@dataclass
class Budget:
    """The run's time limit: a section starts only when its estimate still fits."""

    deadline: float

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


class Results:
    """Appends each finished section to results.jsonl and report.md at once."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl, self.report = out / "results.jsonl", out / "report.md"
        self.jsonl.write_text("")
        self.report.write_text(f"# GPU serving run {time.strftime('%Y-%m-%d %H:%M:%S')}\n\n")

    def add(self, section: str, data: dict[str, Any], text: str) -> None:
        with self.jsonl.open("a") as f:
            f.write(json.dumps({"section": section, **data}) + "\n")
        with self.report.open("a") as f:
            f.write(f"## {section}\n\n{text}\n\n")
        print(f"== {section}\n{text}", flush=True)


# --- models ---------------------------------------------------------------------------------


def prepare(out: Path, arch: str, size: int, classes: int) -> list[Path]:
    """Export `arch` (random weights) as fp32 ONNX and as fp16 with fp32 inputs and outputs (what
    `hrnet export --precision fp16` writes: fp16 weights and compute behind two casts)."""
    import mindspore as ms
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from core.metadata import ModelMetadata
    from training.export import export_network
    from training.model import create_model

    out.mkdir(parents=True, exist_ok=True)
    ms.set_seed(1)
    fp32 = export_network(
        create_model(arch, classes),
        ModelMetadata(arch=arch, num_classes=classes, input_size=size),
        "ONNX",
        out / f"{arch}.onnx",
    )
    fp16 = out / f"{arch}_fp16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), str(fp16))
    return [fp32, fp16]


# --- ceiling --------------------------------------------------------------------------------


def ceiling(model: Path, device: str, max_batch: int, seconds: float) -> dict[str, Any]:
    """Our backend in this process, on one instance thread, at every bucket up to `max_batch`;
    with three checks: the providers' options, padded == unpadded, and the logits against CPU."""
    import onnxruntime as ort

    from serving.backends import open_backend
    from serving.backends.instance import ModelInstance
    from serving.config import BatchingConfig, ModelConfig

    config = ModelConfig(
        device=device, batching=BatchingConfig(max_batch_size=max_batch, max_queue_size=max(256, max_batch))
    )
    buckets = config.batching.buckets()
    started = time.monotonic()
    instance = ModelInstance(lambda: open_backend(model, config, 0, buckets), "ceiling")
    backend = instance.ready.result()
    load_s = time.monotonic() - started
    assert backend.input is not None
    item = tuple(d if d > 0 else 224 for d in backend.input.shape[1:])
    sample = np.random.default_rng(0).normal(0, 1, (max_batch, *item)).astype(np.float32)

    def rate(call: Any, rows: int) -> tuple[float, float, float]:
        """(first call s, img/s, ms per call) of `call(rows)` repeated for `seconds` (3 calls at least)."""
        first = time.perf_counter()
        call(rows)
        first_s = time.perf_counter() - first
        runs, start = 0, time.perf_counter()
        while runs < 3 or time.perf_counter() - start < seconds:
            call(rows)
            runs += 1
        elapsed = time.perf_counter() - start
        return first_s, rows * runs / elapsed, elapsed / runs * 1e3

    def bound(rows: int) -> np.ndarray:
        return backend.run([sample[:rows]], rows)

    def plain(rows: int) -> np.ndarray:
        return backend.infer(sample[:rows])

    try:
        by_bucket = {}
        for rows in buckets:
            first_s, img_s, ms = instance.submit(lambda _b, r=rows: rate(bound, r)).result()
            by_bucket[rows] = {"first_run_s": first_s, "img_s": img_s, "batch_ms": ms}
        session_run = instance.submit(lambda _b: rate(plain, max_batch)[1]).result()
        runtime = instance.submit(lambda b: b.runtime_options()).result()
        few = min(3, max_batch)
        unpadded = instance.submit(lambda b: b.run([sample[:few]], few)).result()
        padded = instance.submit(lambda b: b.run([sample[:few]], max_batch)).result()
        pinned = bool(getattr(backend, "pinned", False))
    finally:
        instance.close().result(60)
    cpu = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    reference = cpu.run(None, {cpu.get_inputs()[0].name: sample[:few]})[0].astype(np.float32)
    return {
        "load_s": load_s,
        "buckets": by_bucket,
        "session_run_img_s": session_run,
        "pinned": pinned,
        "runtime": runtime,
        "padding_max_abs_diff": float(np.abs(padded - unpadded).max()),
        "cpu_max_rel_diff": float(np.abs(unpadded - reference).max() / max(1e-12, np.abs(reference).max())),
        "cpu_same_top1": bool((unpadded.argmax(1) == reference.argmax(1)).all()),
    }


def ceiling_text(c: dict[str, Any]) -> str:
    lines = ["| batch | first run s | img/s | ms per batch |", "|---|---|---|---|"]
    for rows, b in c["buckets"].items():
        lines.append(f"| {rows} | {b['first_run_s']:.2f} | {b['img_s']:.1f} | {b['batch_ms']:.1f} |")
    first = sum(b["first_run_s"] for b in c["buckets"].values())
    lines += [
        "",
        f"load {c['load_s']:.1f} s; first runs of all buckets {first:.1f} s; plain session.run at the "
        f"largest bucket {c['session_run_img_s']:.1f} img/s; input buffer page-locked: {c['pinned']}",
        f"checks: padded vs unpadded max |diff| {c['padding_max_abs_diff']:.2e}; against CPU max rel "
        f"diff {c['cpu_max_rel_diff']:.2e}, same top-1: {c['cpu_same_top1']}",
        *(f"{key}: {value}" for key, value in c["runtime"].items()),
    ]
    return "\n".join(lines)


# --- load -----------------------------------------------------------------------------------


def raw_request(model: str, input_name: str, item: tuple[int, ...]) -> bytes:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=input_name, datatype="FP32", shape=[1, *item])
    request.raw_input_contents.append(
        np.random.default_rng(1).normal(0, 1, (1, *item)).astype(np.float32).tobytes()
    )
    return request.SerializeToString()


def jpeg_request(model: str, input_name: str) -> bytes:
    from PIL import Image

    h, w = JPEG_SIZE[1], JPEG_SIZE[0]
    y, x = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(2).integers(0, 40, (h, w, 3))
    rgb = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1) + noise
    buffer = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=input_name, datatype="BYTES", shape=[1])
    request.raw_input_contents.append(struct.pack("<I", len(data)) + data)
    return request.SerializeToString()


def _load_worker(address: str, payload: bytes, callers: int, begin: float, end: float, out: Any) -> None:
    """One generator process: `callers` closed-loop callers; latencies of calls that started
    inside [begin, end] (CLOCK_MONOTONIC is shared by all processes)."""

    async def main() -> tuple[list[float], Counter]:
        latencies: list[float] = []
        errors: Counter = Counter()
        options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            call = channel.unary_unary(INFER)  # bytes in, bytes out: serialized once, never parsed

            async def caller() -> None:
                while (now := time.monotonic()) < end:
                    try:
                        await call(payload, timeout=60)
                    except grpc.RpcError as exc:
                        errors[exc.code().name] += 1
                        continue
                    if now >= begin:
                        latencies.append(time.monotonic() - now)

            await asyncio.gather(*(caller() for _ in range(callers)))
        return latencies, errors

    latencies, errors = asyncio.run(main())
    out.put((latencies, dict(errors)))


def load(
    address: str, model: str, payload: bytes, callers: int, processes: int, warmup_s: float, seconds: float
) -> dict[str, Any]:
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    begin = time.monotonic() + warmup_s + 2.0  # processes start within the first 2 s
    end = begin + seconds
    shares = [callers // processes + (i < callers % processes) for i in range(processes)]
    workers = [
        context.Process(target=_load_worker, args=(address, payload, n, begin, end, queue), daemon=True)
        for n in shares
        if n
    ]
    for w in workers:
        w.start()
    time.sleep(max(0.0, begin - time.monotonic()))
    before = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model)).model_stats[0]
    time.sleep(max(0.0, end - time.monotonic()))
    after = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model)).model_stats[0]
    latencies: list[float] = []
    errors: Counter = Counter()
    for _ in workers:
        lat, err = queue.get(timeout=120)
        latencies += lat
        errors.update(err)
    for w in workers:
        w.join(30)
    executions = after.execution_count - before.execution_count
    ms = np.array(latencies) * 1e3 if latencies else np.array([np.nan])
    return {
        "callers": callers,
        "processes": len(workers),
        "img_s": len(latencies) / seconds,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_batch": (after.inference_count - before.inference_count) / max(1, executions),
        "errors": dict(errors),
    }


def serve_and_load(
    model: Path, name: str, kinds: list[str], args: argparse.Namespace, budget: Budget
) -> dict[str, dict[str, Any]]:
    from serving.process import ServerProcess

    flags = [
        "--model", model, "--model-name", name, "--metrics-port", "-1", "--device", args.device,
        "--max-batch-size", str(args.max_batch_size), "--max-queue-size", str(max(256, 4 * args.callers)),
        *[f for flag in args.server_flag for f in shlex.split(flag)],
    ]  # fmt: skip
    # PYTHONSAFEPATH: `python -m` would otherwise put the working directory (this tree) first
    env = {"PYTHONPATH": args.server_pythonpath, "PYTHONSAFEPATH": "1"} if args.server_pythonpath else None
    out: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    with ServerProcess(flags, env=env) as server:
        start_s = time.monotonic() - started
        stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.address))
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=name))
        config = stub.ModelConfig(pb.ModelConfigRequest(name=name)).config
        warmup = (
            config.parameters["warmup_seconds"].string_value if "warmup_seconds" in config.parameters else ""
        )
        item = tuple(int(d) for d in meta.inputs[0].shape[1:])
        for kind in kinds:
            if not budget.allows(args.seconds + 15):
                out[kind] = {"skipped": "time budget spent"}
                continue
            payload = (
                raw_request(name, meta.inputs[0].name, item)
                if kind == "raw"
                else jpeg_request(name, meta.inputs[0].name)
            )
            result = load(
                server.address, name, payload, args.callers, args.processes, args.warmup_s, args.seconds
            )
            out[kind] = {**result, "server_start_s": start_s, "server_warmup_s": warmup}
    return out


def load_text(r: dict[str, Any], ceiling_img_s: float | None, max_batch_ms: float | None) -> str:
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    ratio = f"{r['img_s'] / ceiling_img_s:.2f}" if ceiling_img_s else "n/a"
    p99_x = f"{r['p99_ms'] / max_batch_ms:.1f}x" if max_batch_ms else "n/a"
    return (
        f"{r['img_s']:.1f} img/s at {r['callers']} callers ({r['processes']} generator processes); "
        f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms ({p99_x} one max batch's compute); "
        f"mean executed batch {r['mean_batch']:.1f}; server/ceiling {ratio}; errors {r['errors'] or 'none'}; "
        f"server start {r['server_start_s']:.1f} s, warm-up {r['server_warmup_s'] or '?'} s"
    )


def environment() -> dict[str, Any]:
    import onnxruntime as ort

    gpus = cpu = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return {
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "gpus": gpus,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
    }


def run(args: argparse.Namespace) -> int:
    budget = Budget(time.monotonic() + args.budget_s)
    results = Results(args.out)
    env = environment()
    results.add("environment", env, "\n".join(f"- {k}: {v}" for k, v in env.items()))
    skipped = {"skipped": "time budget spent"}
    for spec in args.model:
        name, _, path = spec.partition("=")
        model = Path(path)
        ceiling_img_s = max_batch_ms = None
        if "ceiling" in args.sections:
            if budget.allows(60):
                c = ceiling(model, args.device, args.max_batch_size, args.ceiling_seconds)
                largest = c["buckets"][max(c["buckets"])]
                ceiling_img_s, max_batch_ms = largest["img_s"], largest["batch_ms"]
                results.add(f"{name}: ceiling", c, ceiling_text(c))
            else:
                results.add(f"{name}: ceiling", skipped, load_text(skipped, None, None))
        kinds = [k for k in ("raw", "jpeg") if k in args.sections]
        loads = (
            serve_and_load(model, name, kinds, args, budget)
            if kinds and budget.allows(args.seconds + 60)
            else {}
        )
        for kind in kinds:
            r = loads.get(kind, skipped)
            results.add(f"{name}: server {kind}", r, load_text(r, ceiling_img_s, max_batch_ms))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_serving", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="export fp32 and fp16 ONNX (random weights) to measure")
    p.add_argument("--out", type=Path, default=Path("gpu-models"))
    p.add_argument("--arch", default="w48")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--classes", type=int, default=1000)
    r = sub.add_parser("run", help="measure the ceiling and the server for each model")
    r.add_argument("--model", action="append", required=True, help="NAME=PATH.onnx (repeatable)")
    r.add_argument("--device", default="gpu")
    r.add_argument("--max-batch-size", type=int, default=64)
    r.add_argument("--callers", type=int, default=64)
    r.add_argument("--processes", type=int, default=4, help="load generator processes")
    r.add_argument("--seconds", type=float, default=20.0, help="measured window per load")
    r.add_argument("--warmup-s", type=float, default=3.0, help="load before the window opens")
    r.add_argument("--ceiling-seconds", type=float, default=2.0, help="per bucket")
    r.add_argument("--sections", default="ceiling,raw,jpeg")
    r.add_argument("--budget-s", type=float, default=540.0, help="the whole run")
    r.add_argument("--server-flag", action="append", default=[], help="passed to hrnet serve (repeatable)")
    r.add_argument("--server-pythonpath", default="", help="run the server from another source tree")
    r.add_argument("--out", type=Path, default=Path("benchmark-out"))
    args = parser.parse_args(argv)
    if args.command == "prepare":
        for path in prepare(args.out, args.arch, args.size, args.classes):
            print(path)
        return 0
    args.sections = args.sections.split(",")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
