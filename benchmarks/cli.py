"""`hrnet bench`: for now, the effect of dynamic batching on one model (the full CLI comes later).

    hrnet bench --model model.onnx [--concurrency 16] [--requests 800] [--max-batch-size 16] [--repeats 5]

Starts `hrnet serve` twice on 127.0.0.1, without batching and with it, sends the same load and
prints img/s, p50/p99 latency and the mean executed batch for each, then the median speed-up.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from core.errors import CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="ONNX or MINDIR file to serve")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent callers (default 16)")
    parser.add_argument("--requests", type=int, default=800, help="single-image requests per setting")
    parser.add_argument(
        "--max-batch-size", type=int, default=16, help="batch size when batching (default 16)"
    )
    parser.add_argument("--max-queue-delay-us", type=int, default=2000, help="batching wait (default 2000)")
    parser.add_argument("--repeats", type=int, default=1, help="alternate the two settings this many times")


def run(args: argparse.Namespace) -> int:
    from benchmarks.batching import compare, report

    if not args.model.is_file():
        raise CommandError(f"model file {args.model} does not exist")
    if args.concurrency < 1 or args.requests < args.concurrency or args.repeats < 1:
        raise CommandError("need --concurrency >= 1, --requests >= --concurrency and --repeats >= 1")
    results = compare(
        args.model,
        args.concurrency,
        args.requests,
        args.max_batch_size,
        args.max_queue_delay_us,
        args.repeats,
    )
    print(report(results, args.concurrency))
    return 0
