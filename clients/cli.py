"""`hrnet classify`: classify image files and folders through a running server.

Images go over one ClassifyStream call with `--concurrency` of them at the server at once, so
the server can batch them. One bad image costs only its own result; the exit status says
whether everything succeeded (0), some images failed (1), or nothing could be done (2: the
server is unreachable, the credentials are rejected, the model or version is not served).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import grpc
from tqdm import tqdm

from clients.client import Client
from clients.core import DEFAULT_TARGET
from clients.errors import ClientError
from clients.images import find_images
from clients.options import add_security_arguments, tls_config, token
from clients.results import StreamResult
from core.errors import CommandError
from protos import DEFAULT_TOP_K


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs", nargs="+", metavar="IMG_OR_DIR", help="image files and/or folders of images"
    )
    parser.add_argument(
        "--server",
        default=DEFAULT_TARGET,
        metavar="HOST:PORT[,HOST:PORT...]",
        help="the server, several replicas separated by commas, or dns:///NAME:PORT (default: %(default)s)",
    )
    parser.add_argument("--model", default=None, help="model name (default: the server's default model)")
    parser.add_argument(
        "--model-version",
        default=None,
        metavar="N",
        help="model version (default: the newest the server serves)",
    )
    parser.add_argument(
        "--top-k", type=int, default=DEFAULT_TOP_K, help="classes per image (default: %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per image instead of tables")
    parser.add_argument(
        "--concurrency", type=int, default=8, help="images at the server at once (default: %(default)s)"
    )
    parser.add_argument("--timeout", type=float, default=None, metavar="S", help="deadline for the whole run")
    add_security_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.top_k < 1 or args.concurrency < 1:
        raise CommandError(f"--top-k and --concurrency must be >= 1, got {args.top_k} and {args.concurrency}")
    if args.model_version is not None and not args.model_version.isdigit():
        raise CommandError(f"--model-version is a positive integer, got {args.model_version!r}")
    paths = find_images(args.inputs)
    if not paths:
        raise CommandError(f"no image files found in {' '.join(args.inputs)}")
    show_bar = any(Path(p).is_dir() for p in args.inputs)
    failed = 0
    with (
        _client(args) as client,
        tqdm(total=len(paths), unit="img", disable=not show_bar, file=sys.stderr) as bar,
    ):
        results = client.classify_stream(
            paths,
            top_k=args.top_k,
            model=args.model,
            version=args.model_version,
            max_in_flight=args.concurrency,
            timeout_s=args.timeout,
        )
        try:
            for result in results:
                if result.error is not None and result.error.code == grpc.StatusCode.NOT_FOUND:
                    raise result.error  # the model or version, the same for every image
                failed += not result.ok
                text = (
                    _json_line(paths[result.index], result)
                    if args.json
                    else _table(paths[result.index], result)
                )
                bar.write(text, file=sys.stdout)
                bar.update()
        except ClientError as exc:
            raise CommandError(_explain(exc, args.server)) from None
        except BrokenPipeError:  # `hrnet classify DIR | head`: the reader has seen enough
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
    if failed:
        print(f"hrnet classify: {failed} of {len(paths)} images failed", file=sys.stderr)
        return 1
    return 0


def _client(args: argparse.Namespace) -> Client:
    try:
        return Client(
            args.server, model=args.model, timeout_s=args.timeout, tls=tls_config(args), token=token(args)
        )
    except (ClientError, ValueError) as exc:
        raise CommandError(str(exc)) from None


def _explain(error: ClientError, server: str) -> str:
    hints = {
        grpc.StatusCode.UNAVAILABLE: f"cannot reach the server at {server} (is `hrnet serve` running?)",
        grpc.StatusCode.UNAUTHENTICATED: f"the server at {server} rejected the credentials (--token)",
        grpc.StatusCode.DEADLINE_EXCEEDED: f"no answer from {server} within --timeout",
    }
    hint = hints.get(error.code)
    return f"{hint}: {error}" if hint else f"{server}: {error}"


def _table(path: Path, result: StreamResult) -> str:
    c = result.classification
    if c is None:
        return f"{path}  ERROR {result.error}"
    width = max(5, *(len(p.label) for p in c.predictions))
    lines = [f"{path}  [{c.model_name} v{c.model_version}, {c.latency_s * 1000:.1f} ms]"]
    lines.append(f"  {'rank':>4}  {'index':>5}  {'label':<{width}}  {'score':>7}")
    for rank, p in enumerate(c.predictions, 1):
        lines.append(f"  {rank:>4}  {p.index:>5}  {p.label:<{width}}  {p.score:>7.4f}")
    return "\n".join(lines)


def _json_line(path: Path, result: StreamResult) -> str:
    c, error = result.classification, result.error
    if c is None or error is not None:
        code, message = (error.code.name, error.message) if error else ("UNKNOWN", "")
        record: dict[str, object] = {"image": str(path), "error": {"code": code, "message": message}}
    else:
        record = {
            "image": str(path),
            "model": c.model_name,
            "version": c.model_version,
            "latency_ms": round(c.latency_s * 1000, 3),
            "predictions": [{"index": p.index, "label": p.label, "score": p.score} for p in c.predictions],
        }
    return json.dumps(record)
