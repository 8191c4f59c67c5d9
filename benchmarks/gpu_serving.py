"""`hrnet bench gpu`: the GPU figures of the serving claim in one prepared run, each section
written as it finishes: the in-process ceiling, then the server, same run, same card.

    hrnet bench gpu prepare --out gpu-models     # W48 fp32 and fp16 ONNX, random weights (MindSpore)
    hrnet bench gpu run --model w48=gpu-models/w48.onnx --model w48-fp16=gpu-models/w48.fp16.onnx \\
        --device gpu --concurrency 64 --workers 4 --out gpu-report

On the lent GPU machine (no package access, transfers of at most 64 MiB; ../shared/gpu/README.md):
here, `bash ../shared/gpu/prepare.sh` (onnxruntime-gpu in parts, wheels), `prepare` as above,
then `python ../shared/gpu/onnx_weights.py zero gpu-models/w48.onnx .gpu/w48.onnx.xz` and the
same for w48.fp16.onnx (66 KiB each once zeroed); there, `bash .gpu/setup.sh stage K` for each
part but the last, then one call with the last part, .gpu/whl, .gpu/setup.sh,
.gpu/onnx_weights.py and both .xz files carried:

    source .gpu/setup.sh install \\
      && python3 .gpu/onnx_weights.py fill .gpu/w48.onnx.xz /tmp/w48.onnx \\
      && python3 .gpu/onnx_weights.py fill .gpu/w48.fp16.onnx.xz /tmp/w48.fp16.onnx \\
      && python3 -m hrnet bench gpu run --model w48=/tmp/w48.onnx \\
           --model w48-fp16=/tmp/w48.fp16.onnx --budget-s 420 --out $OUT/gpu

For every model, in order, each section skipped (and said so) when the time budget is spent:
1. **ceiling**: the model through our own backend in this process on the instance's own thread,
   at every batch bucket: the first run of each shape (what warm-up pays) and the steady img/s.
   Also plain `InferenceSession.run` at the largest bucket (no IOBinding), for reference, and
   three checks: the providers' effective options, padded == unpadded logits, logits against CPU.
2. **raw**: `hrnet serve` on 127.0.0.1 under `--concurrency` closed-loop callers sending one
   FP32 image per ModelInfer, from `--workers` generator processes (`hrnet bench load`'s load
   generator), so the generator is not the cap: img/s, p50/p99, the batch sizes run
   (ModelStatistics), the warm-up time the server reports, and the ratio to the ceiling at the
   largest bucket.
3. **jpeg**: the same with a 500x375 JPEG per request (BYTES, decoded by the server).
4. **tune**, with `--tune-p99-ms MS` only: `hrnet bench tune` on this card within what is left of
   the budget (at most `--tune-budget-s`): its report and the chosen serving.yaml in OUT/tune-NAME/.

Results go to OUT/results.jsonl (one line per section as it finishes) and OUT/report.md; a
killed run keeps what it finished. Rehearse on CPU with a small model and `--device cpu`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks.loadgen import Level, LoadGenerator
from benchmarks.machine import this_machine
from benchmarks.report import gpu_summary
from benchmarks.sweep import LevelResult, WorkloadSpec
from benchmarks.targets import ServerSource, gpu_probe, hrnet_target, window_probes
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc

JPEG_SIZE = (500, 375)  # the issue's JPEG requests
SECTIONS = ("ceiling", "raw", "jpeg")
MIN_TUNE_S = 120.0  # a tune given less than this measures little beyond the defaults


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
    """Export `arch` (random weights) as fp32 ONNX and as fp16 with fp32 inputs and outputs, by
    the conversion `hrnet export --precision fp16` uses (without its accuracy gate: random weights
    have no accuracy to keep).

    The one place a benchmark imports training, and only inside this function (tests/test_layers.py
    lists it in LAZY): the GPU run must measure the files `hrnet export` writes, so it calls
    training's own export and fp16 conversion rather than a copy of them, and every other
    benchmark, `hrnet bench gpu run` included, still never loads MindSpore."""
    import mindspore as ms
    import onnx

    from core.metadata import ModelMetadata
    from training.export import export_network
    from training.model import create_model
    from training.onnx_graph import attach_metadata
    from training.precision import convert_fp16

    out.mkdir(parents=True, exist_ok=True)
    ms.set_seed(1)
    metadata = ModelMetadata(arch=arch, num_classes=classes, input_size=size)
    fp32 = export_network(create_model(arch, classes), metadata, "ONNX", out / f"{arch}.onnx")
    fp16 = out / f"{arch}.fp16.onnx"
    with tempfile.TemporaryDirectory(prefix="hrnet-fp16-") as work:
        convert_fp16(fp32, fp16, Path(work))
    card = dataclasses.replace(metadata, precision="fp16")
    onnx.save(attach_metadata(onnx.load(str(fp16)), card), str(fp16))
    return [fp32, fp16]


# --- ceiling --------------------------------------------------------------------------------


def ceiling(model: Path, device: str, max_batch: int, seconds: float) -> dict[str, Any]:
    """Our backend in this process, on one instance thread, at every bucket up to `max_batch`;
    with three checks: the providers' options, padded == unpadded, and the logits against CPU.

    Not `benchmarks.ceiling.measure`: this one runs as a server instance does (its own thread,
    the bound buffers, padded buckets) and keeps the first run of each shape, the cost warm-up
    pays on a GPU, which `measure` discards as warm-up."""
    import onnxruntime as ort

    from serving.config import BatchingConfig, ModelConfig
    from serving.engine.backends import open_backend
    from serving.engine.backends.instance import ModelInstance

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


def jpeg_folder(folder: Path) -> Path:
    """One 500x375 JPEG (a gradient with noise, so it compresses like a photo) in `folder`."""
    from PIL import Image

    width, height = JPEG_SIZE
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(2).integers(0, 40, (height, width, 3))
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1) + noise
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(folder / "photo.jpg", quality=90)
    return folder


def serve_and_load(
    model: Path,
    name: str,
    kinds: list[str],
    args: argparse.Namespace,
    budget: Budget,
    ceiling_img_s: float | None,
) -> dict[str, dict[str, Any]]:
    """`hrnet serve` on 127.0.0.1 and one closed-loop level per kind of request, through the
    load generator of `hrnet bench load` (its worker processes, its statistics and CPU probes)."""
    flags = [
        "--device", args.device, "--max-batch-size", str(args.max_batch_size),
        "--max-queue-size", str(max(256, 4 * args.concurrency)), *shlex.split(args.serve_args),
    ]  # fmt: skip
    level = Level(concurrency=args.concurrency, warmup_s=args.warmup, duration_s=args.duration)
    out: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    with (
        hrnet_target(ServerSource(model=model, model_name=name), flags, device=args.device) as target,
        LoadGenerator(args.workers) as generator,
        gpu_probe() as gpus,
        tempfile.TemporaryDirectory(prefix="hrnet-gpu-bench-") as work,
    ):
        start_s = time.monotonic() - started
        stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(target.address))
        parameters = stub.ModelConfig(pb.ModelConfigRequest(name=target.model.name)).config.parameters
        warmup = parameters["warmup_seconds"].string_value if "warmup_seconds" in parameters else ""
        for kind in kinds:
            if not budget.allows(args.warmup + args.duration + 15):
                out[kind] = {"skipped": "time budget spent"}
                continue
            images = jpeg_folder(Path(work) / "jpeg") if kind == "jpeg" else None
            generator.add_target(kind, target.address, WorkloadSpec(images=images).build(target.model))
            probes = window_probes(target, gpus)
            result = LevelResult.of(generator.run(kind, level, probes), ceiling_img_s)
            out[kind] = {
                **dataclasses.asdict(result),
                "workers": args.workers,
                "server_start_s": start_s,
                "server_warmup_s": warmup,
            }
    return out


def load_text(r: dict[str, Any], max_batch_ms: float | None) -> str:
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    ratio = f"{r['ratio_to_ceiling']:.2f}" if r["ratio_to_ceiling"] else "n/a"
    p99_x = (
        f" ({r['p99_ms'] / max_batch_ms:.1f}x one max batch's compute)"
        if max_batch_ms and r["p99_ms"]
        else ""
    )
    sizes = " ".join(f"{size}x{n}" for size, n in (r["batch_sizes"] or {}).items()) or "?"
    return (
        f"{r['img_s']:.1f} img/s at {r['concurrency']} callers ({r['workers']} generator processes); "
        f"p50 {r['p50_ms'] or 0:.1f} ms, p99 {r['p99_ms'] or 0:.1f} ms{p99_x}; batches run {sizes} "
        f"(mean {r['mean_batch'] or 0:.1f}); server/ceiling {ratio}; errors {r['errors'] or 'none'}; "
        f"server start {r['server_start_s']:.1f} s, warm-up {r['server_warmup_s'] or '?'} s"
        + (f"; GPU {gpu_summary(r['gpu'])} (utilization, peak memory, power)" if r.get("gpu") else "")
    )


def run(args: argparse.Namespace) -> int:
    """`hrnet bench gpu run`: every section for every model, within `--budget-s`."""
    budget = Budget(time.monotonic() + args.budget_s)
    results = Results(args.out)
    machine = this_machine()
    results.add("environment", dataclasses.asdict(machine), machine.describe())
    skipped = {"skipped": "time budget spent"}
    sections = [s for s in args.sections.split(",") if s]
    for spec in args.model:
        name, _, path = spec.rpartition("=")
        model = Path(path)
        name = name or model.stem
        ceiling_img_s = max_batch_ms = None
        if "ceiling" in sections:
            if budget.allows(60):
                c = ceiling(model, args.device, args.max_batch_size, args.ceiling_seconds)
                largest = c["buckets"][max(c["buckets"])]
                ceiling_img_s, max_batch_ms = largest["img_s"], largest["batch_ms"]
                results.add(f"{name}: ceiling", c, ceiling_text(c))
            else:
                results.add(f"{name}: ceiling", skipped, load_text(skipped, None))
        kinds = [k for k in ("raw", "jpeg") if k in sections]
        enough = budget.allows(args.warmup + args.duration + 60)
        loads = serve_and_load(model, name, kinds, args, budget, ceiling_img_s) if kinds and enough else {}
        for kind in kinds:
            r = loads.get(kind, skipped)
            results.add(f"{name}: server {kind}", r, load_text(r, max_batch_ms))
        if args.tune_p99_ms:
            if budget.allows(MIN_TUNE_S):
                tuned, text = tune_section(model, name, args, budget)
                results.add(f"{name}: tune", tuned, text)
            else:
                results.add(f"{name}: tune", skipped, load_text(skipped, None))
    return 0


def tune_section(
    model: Path, name: str, args: argparse.Namespace, budget: Budget
) -> tuple[dict[str, Any], str]:
    """`hrnet bench tune` on this card, parsed by its own parser so its defaults hold, within
    what is left of the run's budget; its report and serving.yaml go to OUT/tune-NAME/."""
    from benchmarks import report, tune

    folder = args.out / f"tune-{name}"
    parser = argparse.ArgumentParser()
    tune.add_arguments(parser)
    budget_s = min(args.tune_budget_s, budget.left() - 10)
    tune_args = parser.parse_args(
        [
            *("--model", str(model), "--p99-ms", str(args.tune_p99_ms)),
            *("--out", str(folder / "serving.yaml"), "--budget-s", str(budget_s)),
            *("--workers", str(args.workers), *shlex.split(args.tune_args)),
        ]
    )
    tune_args.device, tune_args.note = args.device, f"from hrnet bench gpu run, model {name}"
    document = tune.run(tune_args).as_dict()
    report.write(document, None, folder)
    return document["tune"], "\n".join(
        [*report.tune_lines(document["tune"]), f"report: {folder / 'tune.md'}"]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`hrnet bench gpu prepare | run`."""
    steps = parser.add_subparsers(dest="gpu_step", required=True, metavar="STEP")
    p = steps.add_parser("prepare", help="export fp32 and fp16 ONNX (random weights) to measure")
    p.add_argument("--out", type=Path, default=Path("gpu-models"), help="default gpu-models")
    p.add_argument("--arch", default="w48", help="default w48")
    p.add_argument("--size", type=int, default=224, help="input size (default 224)")
    p.add_argument("--classes", type=int, default=1000, help="default 1000")
    r = steps.add_parser("run", help="the ceiling, then the server, for each model, within a time budget")
    r.add_argument("--model", action="append", required=True, help="[NAME=]PATH.onnx (repeatable)")
    r.add_argument("--device", default="gpu", choices=["cpu", "gpu"], help="default gpu")
    r.add_argument("--max-batch-size", type=int, default=64, help="hrnet serve --max-batch-size (default 64)")
    r.add_argument("--concurrency", type=int, default=64, help="closed-loop callers (default 64)")
    r.add_argument("--workers", type=int, default=4, help="load generator processes (default 4)")
    r.add_argument("--duration", type=float, default=20.0, help="seconds measured per load (default 20)")
    r.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring (default 3)")
    r.add_argument("--ceiling-seconds", type=float, default=2.0, help="per bucket (default 2)")
    r.add_argument("--sections", default=",".join(SECTIONS), help="default ceiling,raw,jpeg")
    r.add_argument("--budget-s", type=float, default=540.0, help="the whole run (default 540)")
    r.add_argument("--serve-args", default="", help="more `hrnet serve` flags, e.g. '--workers 8'")
    r.add_argument("--out", type=Path, default=Path("gpu-report"), help="default gpu-report")
    r.add_argument(
        "--tune-p99-ms",
        type=float,
        help="after each model's load sections, `hrnet bench tune` at this p99 target (off by default)",
    )
    r.add_argument(
        "--tune-budget-s",
        type=float,
        default=600.0,
        help="the tune's budget, within --budget-s (default 600)",
    )
    r.add_argument(
        "--tune-args", default="", help="more `hrnet bench tune` flags, with '=': --tune-args='--rounds 1'"
    )


def main(args: argparse.Namespace) -> int:
    if args.gpu_step == "prepare":
        for path in prepare(args.out, args.arch, args.size, args.classes):
            print(path)
        return 0
    return run(args)
