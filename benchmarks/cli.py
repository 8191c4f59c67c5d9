"""`hrnet bench MODE`: how fast and how accurate the server is, against the hardware and the peers.

    hrnet bench ceiling  --model a.onnx [--model b.onnx] [--batch-sizes 1,2,4,8,16,32]
    hrnet bench load     --model m.onnx | --repo DIR | --url HOST:PORT  [--concurrency 1,4,16,64]
                         [--rate 20,40]                              # open loop, Poisson arrivals
    hrnet bench peers    --model m.onnx [--concurrency 1,2,4,8,16,32]  # ours and MLServer, one run
    hrnet bench accuracy --model m.onnx --data VAL_DIR [--ckpt CKPT]   # top-1/5, against hrnet eval
    hrnet bench batching --model m.onnx [--concurrency 16] [--repeats 3]  # batching off vs on
    hrnet bench soak     --model m.onnx [--duration 300] [--load 2]    # overload, and what must hold
    hrnet bench gpu      prepare | run --model NAME=m.onnx            # the prepared GPU run, budgeted
    hrnet bench overhead [--serve-workers 1,2] [--payloads fp32,uint8,jpeg]  # server CPU per request
    hrnet bench tune     --model m.onnx --p99-ms 100 [--budget-s 600] [--val DIR] --out serving.yaml

Every mode but gpu prints a table and takes `--json FILE`; all but soak and gpu also `--report
DIR` (Markdown, JSON, PNG plots); gpu writes OUT/results.jsonl and OUT/report.md section by section.
Servers started here listen on 127.0.0.1 only and are always stopped.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from benchmarks import gpu_serving, tune
from benchmarks.arguments import floats, ints
from core.errors import CommandError

MODES = ("ceiling", "load", "peers", "accuracy", "batching", "soak", "gpu", "overhead", "tune")


def _output(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--json", type=Path, help="write the results as JSON here")
    group.add_argument("--report", type=Path, help="write MODE.md, MODE.json and MODE_*.png into this folder")
    group.add_argument("--note", default="", help="conditions to state in the report (e.g. 'shared machine')")
    group.add_argument(
        "--device", default="cpu", choices=["cpu", "gpu"], help="where backends run (default cpu)"
    )


def _server(parser: argparse.ArgumentParser, model_help: str) -> None:
    group = parser.add_argument_group("server under test")
    group.add_argument("--url", default="", help="a running server, HOST:PORT (KServe v2 gRPC)")
    group.add_argument("--model", type=Path, help=model_help)
    group.add_argument("--repo", type=Path, help="start `hrnet serve --repo DIR` on 127.0.0.1")
    group.add_argument("--model-name", default="", help="the model to load (default: the server's only one)")
    group.add_argument("--api", default="kserve", choices=["kserve", "classifier"], help="default kserve")
    group.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")


def _load(parser: argparse.ArgumentParser, concurrency_help: str) -> None:
    group = parser.add_argument_group("load")
    group.add_argument("--concurrency", type=ints, help=concurrency_help)
    group.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of load before measuring (default 2)"
    )
    group.add_argument("--duration", type=float, default=10.0, help="seconds measured per level (default 10)")
    group.add_argument("--requests", type=int, default=0, help="measure this many requests per level instead")
    group.add_argument("--workers", type=int, default=1, help="load generator processes (default 1)")
    group.add_argument(
        "--images", type=Path, help="send encoded images from this folder (default: FP32 tensors)"
    )
    group.add_argument("--images-per-request", type=int, default=1, help="default 1")
    group.add_argument("--streaming", action="store_true", help="one bidirectional stream per worker")
    group.add_argument(
        "--max-batch-size",
        type=int,
        default=0,
        help="hrnet serve --max-batch-size (default %(default)s; 0: the server's own)",
    )
    group.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=None,
        help="hrnet serve --max-queue-delay-us (default %(default)s; None: the server's own)",
    )
    _ceiling_options(parser)


def _ceiling_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ceiling (the served file in-process, same backend)")
    group.add_argument("--batch-sizes", type=ints, help="default 1, 2, 4, ... up to the server's max batch")
    group.add_argument("--ceiling-seconds", type=float, default=2.0, help="per batch size (default 2)")
    group.add_argument("--no-ceiling", action="store_true", help="skip it (ratios are then not reported)")


def _paired(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--paired",
        type=int,
        default=0,
        metavar="N",
        help="after the sweep, N alternated pairs of the ceiling and our server at its saturation "
        "level: the ratio with the machine's drift taken out (default 0: none)",
    )


def _soak_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="ONNX or MINDIR file to serve")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of overload (default 300)")
    parser.add_argument("--load", type=float, default=2.0, help="offered load / capacity (default 2)")
    parser.add_argument(
        "--capacity-seconds", type=float, default=10.0, help="capacity measurement (default 10)"
    )
    parser.add_argument(
        "--image-share", type=float, default=0.5, help="share of encoded-image requests (default 0.5)"
    )
    parser.add_argument(
        "--cancel-share", type=float, default=0.1, help="share cancelled by the client (default 0.1)"
    )
    parser.add_argument(
        "--deadline-ms",
        type=float,
        nargs=2,
        default=(50.0, 2000.0),
        metavar=("MIN", "MAX"),
        help="each request's deadline, drawn uniformly (default 50 2000)",
    )
    parser.add_argument(
        "--p99-bound-ms", type=float, default=2000.0, help="p99 of accepted requests, at most (default 2000)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0] if __doc__ else None
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1] if __doc__ else None
    modes = parser.add_subparsers(dest="mode", required=True, metavar="MODE")

    p = modes.add_parser(
        "ceiling", help="in-process img/s and latency per batch size, several files side by side"
    )
    p.add_argument(
        "--model", type=Path, action="append", required=True, help="ONNX or MINDIR file (repeatable)"
    )
    p.add_argument("--batch-sizes", type=ints, help="default 1,2,4,8,16,32")
    p.add_argument("--seconds", type=float, default=2.0, help="measured per batch size (default 2)")
    _output(p)

    p = modes.add_parser("load", help="a concurrency sweep or Poisson rates against one server")
    _server(
        p, "serve this file with `hrnet serve` on 127.0.0.1 (with --url: the file it serves, for the ceiling)"
    )
    _load(p, "closed-loop callers per level (default 1,4,16,64 unless --rate)")
    p.add_argument("--rate", type=floats, help="open-loop levels: Poisson arrivals, requests/s")
    p.add_argument(
        "--serve-args", default="", help="more `hrnet serve` flags, e.g. '--instances 2 --threads 1'"
    )
    _paired(p)
    _output(p)

    p = modes.add_parser("peers", help="ours and MLServer on the same file and load, side by side")
    _server(p, "the ONNX file both servers serve")
    _load(p, "closed-loop callers per level (default 1,4,16,64 unless --rate)")
    p.add_argument("--rate", type=floats, help="open-loop levels: Poisson arrivals, requests/s")
    p.add_argument("--serve-args", default="", help="more `hrnet serve` flags")
    p.add_argument(
        "--peers-dir",
        type=Path,
        default=Path("runs/peers"),
        help="peer virtual environments (default runs/peers)",
    )
    p.set_defaults(max_batch_size=16, max_queue_delay_us=2000)
    _paired(p)
    _output(p)

    p = modes.add_parser(
        "accuracy", help="val top-1/top-5 through the server, image by image against hrnet eval"
    )
    _server(p, "serve this file with `hrnet serve` on 127.0.0.1")
    p.add_argument("--data", type=Path, required=True, help="ImageFolder val set: DIR/<class>/<image>")
    p.add_argument("--ckpt", type=Path, help="checkpoint the export came from: run `hrnet eval` and compare")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    _output(p)

    p = modes.add_parser("batching", help="dynamic batching off vs on at one concurrency, alternated")
    p.add_argument("--model", type=Path, required=True, help="ONNX or MINDIR file to serve")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop callers (default 16)")
    p.add_argument(
        "--repeats", type=int, default=3, help="alternate the two settings this many times (default 3)"
    )
    p.add_argument("--max-batch-size", type=int, default=16, help="batch size when batching (default 16)")
    p.add_argument("--max-queue-delay-us", type=int, default=2000, help="batching wait (default 2000)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring (default 2)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per setting (default 10)")
    p.add_argument("--requests", type=int, default=0, help="measure this many requests instead")
    p.add_argument("--workers", type=int, default=1, help="load generator processes (default 1)")
    p.add_argument("--api", default="kserve", choices=["kserve", "classifier"], help="default kserve")
    p.add_argument("--images", type=Path, help="send encoded images from this folder (default: FP32 tensors)")
    p.add_argument("--images-per-request", type=int, default=1, help="default 1")
    p.add_argument("--streaming", action="store_true", help="one bidirectional stream per worker")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    _ceiling_options(p)
    _output(p)

    p = modes.add_parser("soak", help="twice the measured capacity with deadlines and cancellations")
    _soak_options(p)

    p = modes.add_parser("gpu", help="the prepared GPU run: ceiling per bucket, then the server, budgeted")
    gpu_serving.add_arguments(p)

    p = modes.add_parser(
        "overhead", help="the server's own CPU per request, by process and thread, on a near-free model"
    )
    p.add_argument(
        "--serve-workers", type=ints, default=(1, 2), help="hrnet serve --workers values (default 1,2)"
    )
    p.add_argument(
        "--payloads",
        type=lambda text: tuple(v for v in text.split(",") if v),
        default=("fp32", "uint8", "jpeg"),
        help="one image per request as fp32, uint8 and/or jpeg (default all three)",
    )
    p.add_argument(
        "--event-loops",
        type=lambda text: tuple(v for v in text.split(",") if v),
        default=("auto",),
        help="hrnet serve --event-loop values, alternated like --serve-workers (default auto)",
    )
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop callers (default 16)")
    p.add_argument("--workers", type=int, default=2, help="load generator processes (default 2)")
    p.add_argument(
        "--repeats", type=int, default=1, help="alternate the settings this many times (default 1)"
    )
    p.add_argument("--size", type=int, default=224, help="image side the model takes (default 224)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring (default 2)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per run (default 10)")
    p.add_argument("--serve-args", default="", help="more `hrnet serve` flags")
    p.add_argument(
        "--owner-alone",
        type=lambda text: tuple(int(v) for v in text.split(",") if v),
        default=(1, 2, 16),
        metavar="LIST",
        help="requests in flight when the owner is fed by a stand-in front end (default 1,2,16; empty: skip)",
    )
    p.add_argument(
        "--owner-requests", type=int, default=5000, help="requests per owner-alone run (default 5000)"
    )
    _output(p)

    p = modes.add_parser(
        "tune", help="search the serving settings through a real server; write the best as serving.yaml"
    )
    tune.add_arguments(p)
    _output(p)


def _check(args: argparse.Namespace) -> None:
    if getattr(args, "workers", 1) < 1:
        raise CommandError(f"--workers must be >= 1, got {args.workers}")
    if getattr(args, "requests", 0) < 0 or getattr(args, "warmup", 0) < 0:
        raise CommandError("--requests and --warmup must be >= 0")
    if getattr(args, "requests", 0) == 0 and getattr(args, "duration", 1) <= 0:
        raise CommandError("--duration must be > 0 (or give --requests)")
    if getattr(args, "paired", 0) < 0:
        raise CommandError(f"--paired must be >= 0, got {args.paired}")
    if getattr(args, "repeats", 1) < 1 or (args.mode in ("batching", "accuracy") and args.concurrency < 1):
        raise CommandError("--repeats and --concurrency must be >= 1")
    if args.mode == "batching" and not args.model.is_file():
        raise CommandError(f"model file {args.model} does not exist")


def run(args: argparse.Namespace) -> int:
    from benchmarks import modes, overhead, report, soak

    _check(args)
    if args.mode == "soak":
        return soak.run(args)
    if args.mode == "gpu":
        return gpu_serving.main(args)
    runners: dict[str, Callable[[argparse.Namespace], report.Report]] = {
        "ceiling": modes.ceiling,
        "load": modes.load,
        "peers": lambda a: modes.load(a, with_peers=True),
        "accuracy": modes.accuracy,
        "batching": modes.batching_mode,
        "overhead": overhead.run,
        "tune": tune.run,
    }
    document = runners[args.mode](args).as_dict()
    print(report.terminal(document))
    for path in report.write(document, args.json, args.report):
        print(f"wrote {path}")
    return 0
