"""Each `hrnet bench` mode: the servers it starts, what it measures, and the report it returns.

Servers are started before the ceiling is measured (they idle meanwhile), so the ceiling can use
the batch sizes the server really runs (its ModelConfig), and everything is stopped whatever
happens (an ExitStack around every process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import sys
from collections.abc import Sequence

from benchmarks import batching, paired, sweep
from benchmarks.accuracy import classify_all, compare, image_folder, run_eval, scores
from benchmarks.ceiling import DEFAULT_BATCH_SIZES, Ceiling, measure
from benchmarks.loadgen import Level, LoadGenerator
from benchmarks.machine import this_machine
from benchmarks.peers.mlserver import mlserver_target
from benchmarks.protocol import KSERVE
from benchmarks.protocol import api as make_api
from benchmarks.report import Report
from benchmarks.sweep import WorkloadSpec
from benchmarks.targets import ServerSource, Target, hrnet_target
from core.errors import CommandError
from serving.config import ModelConfig, batch_ladder

DEFAULT_CONCURRENCY = (1, 4, 16, 64)
DEFAULT_MAX_BATCH = 32  # ladder for the ceiling when the server does not state its maximum


def command_line() -> str:
    """How this run was started, as a user would type it (stored with the report)."""
    argv = sys.argv[1:]
    return "hrnet " + shlex.join(argv) if argv[:1] == ["bench"] else shlex.join(sys.argv)


def ceiling(args: argparse.Namespace) -> Report:
    machine = this_machine()
    sizes = args.batch_sizes or DEFAULT_BATCH_SIZES
    config = ModelConfig(device=args.device)
    ceilings = [measure(model, sizes, config, args.seconds) for model in args.model]
    return Report("ceiling", machine, command_line(), args.note, ceilings=ceilings)


def load(args: argparse.Namespace, with_peers: bool = False) -> Report:
    machine = this_machine()
    source = _source(args)
    spec = _workload(args)
    concurrency = args.concurrency or (() if args.rate else DEFAULT_CONCURRENCY)
    levels = sweep.levels(concurrency, args.rate or (), args.warmup, args.duration, args.requests)
    flags = [*_device_flags(args), *_batching_flags(args), *shlex.split(args.serve_args)]
    if with_peers and (spec.api != KSERVE or spec.images is not None):
        raise CommandError("peers take --api kserve with FP32 tensors: their runtime decodes no images")
    with contextlib.ExitStack() as stack:
        ours = stack.enter_context(hrnet_target(source, flags, device=args.device))
        targets = [ours]
        if with_peers:
            if ours.model_file is None:
                raise CommandError("peers need the model file the peer should serve: give --model FILE")
            max_batch = args.max_batch_size or ours.model.max_batch_size
            peer = mlserver_target(
                ours.model_file, ours.model, max_batch, args.max_queue_delay_us, args.device, args.peers_dir
            )
            targets.append(stack.enter_context(peer))
        measured = _ceiling(ours, args)
        generator = stack.enter_context(LoadGenerator(args.workers))
        workloads = {t.label: spec.build(t.model) for t in targets}
        results = sweep.run(generator, targets, workloads, levels, measured)
        pairs = None
        if args.paired and measured:
            level = paired.saturation_level(results[0], list(levels))
            seconds = level.duration_s if not level.requests else args.ceiling_seconds
            pairs = paired.measure_pairs(generator, ours, level, measured, args.paired, seconds)
    report = Report(
        "peers" if with_peers else "load",
        machine,
        command_line(),
        args.note,
        workload={**spec.describe(ours.model), "workers": args.workers},
        ceilings=[measured] if measured else [],
        targets=results,
    )
    if with_peers:
        report.extra["peers"] = _comparison(results)
    if pairs:
        report.extra["paired"] = pairs
    return report


def batching_mode(args: argparse.Namespace) -> Report:
    machine = this_machine()
    source = ServerSource(model=args.model)
    spec = _workload(args)
    device = _device_flags(args)
    on = batching.on_flags(args.max_batch_size, args.max_queue_delay_us)
    level = Level(
        concurrency=args.concurrency, warmup_s=args.warmup, duration_s=args.duration, requests=args.requests
    )
    with contextlib.ExitStack() as stack:
        off_flags = [*device, *batching.OFF_FLAGS]
        off_target = stack.enter_context(hrnet_target(source, off_flags, "no batching", args.device))
        label = f"batching {args.max_batch_size} / {args.max_queue_delay_us} us"
        on_target = stack.enter_context(hrnet_target(source, [*device, *on], label, args.device))
        measured = _ceiling(on_target, args)
        generator = stack.enter_context(LoadGenerator(args.workers))
        targets = [off_target, on_target]
        workloads = {t.label: spec.build(t.model) for t in targets}
        results = sweep.run(generator, targets, workloads, [level] * args.repeats, measured)
    return Report(
        "batching",
        machine,
        command_line(),
        args.note,
        workload={**spec.describe(on_target.model), "workers": args.workers},
        ceilings=[measured] if measured else [],
        targets=results,
        extra={"batching": batching.summarize(results, args.concurrency, args.repeats)},
    )


def accuracy(args: argparse.Namespace) -> Report:
    machine = this_machine()
    source = _source(args)
    classes, images = image_folder(args.data)
    api = make_api(args.api, top_k=5)
    with hrnet_target(source, _device_flags(args), device=args.device) as target:
        predictions, img_s = asyncio.run(
            classify_all(target.address, api, target.model, images, args.concurrency, args.timeout)
        )
    top1, top5 = scores(predictions, [image.label for image in images])
    result = {
        "model": target.model.name,
        "data": str(args.data),
        "classes": len(classes),
        "images": len(images),
        "failed": sum(p is None for p in predictions),
        "top1": top1,
        "top5": top5,
        "img_s": img_s,
        "api": args.api,
    }
    if args.ckpt:
        reference = run_eval(args.ckpt, args.data, args.device)  # after the server stopped: all cores
        agreement, differ = compare(images, predictions, reference["predictions"])
        result["eval"] = {k: reference[k] for k in ("top1", "top5", "images")}
        result["agreement"] = agreement
        result["differ"] = differ
    return Report("accuracy", machine, command_line(), args.note, extra={"accuracy": result})


def _source(args: argparse.Namespace) -> ServerSource:
    return ServerSource(url=args.url, model=args.model, repo=args.repo, model_name=args.model_name)


def _workload(args: argparse.Namespace) -> WorkloadSpec:
    return WorkloadSpec(args.api, args.images, args.images_per_request, args.streaming, args.timeout)


def _device_flags(args: argparse.Namespace) -> list[str]:
    return ["--device", args.device] if args.device != "cpu" else []


def _batching_flags(args: argparse.Namespace) -> list[str]:
    flags = []
    if args.max_batch_size:
        flags += ["--max-batch-size", str(args.max_batch_size)]
    if args.max_queue_delay_us is not None:
        flags += ["--max-queue-delay-us", str(args.max_queue_delay_us)]
    return flags


def _ceiling(target: Target, args: argparse.Namespace) -> Ceiling | None:
    """The ceiling of the file `target` serves, at the batch sizes it can run; None without the file."""
    if args.no_ceiling:
        return None
    if target.model_file is None:
        print("no ceiling: the served model file is unknown (with --url, add --model FILE)", file=sys.stderr)
        return None
    sizes = args.batch_sizes or batch_ladder(target.model.max_batch_size or DEFAULT_MAX_BATCH)
    return measure(target.model_file, sizes, target.model_config, args.ceiling_seconds)


def _comparison(results: Sequence[sweep.TargetResult]) -> dict[str, object]:
    """Ours against each peer, level by level: the speed-up and both p99s."""
    ours, *peers = results
    out: dict[str, object] = {}
    for peer in peers:
        levels = []
        for mine, theirs in zip(ours.levels, peer.levels, strict=True):
            levels.append(
                {
                    "concurrency": mine.concurrency,
                    "rate": mine.rate,
                    "ours_img_s": mine.img_s,
                    "peer_img_s": theirs.img_s,
                    "speedup": mine.img_s / theirs.img_s if theirs.img_s else None,
                    "ours_p99_ms": mine.p99_ms,
                    "peer_p99_ms": theirs.p99_ms,
                }
            )
        out[peer.label] = {
            "levels": levels,
            "ahead_at_every_level": all(lv["speedup"] is None or lv["speedup"] > 1 for lv in levels),
            "p99_not_worse_at_every_level": all(
                lv["ours_p99_ms"] is not None
                and (lv["peer_p99_ms"] is None or lv["ours_p99_ms"] <= lv["peer_p99_ms"])
                for lv in levels
            ),
        }
    return out
