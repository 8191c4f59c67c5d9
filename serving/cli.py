"""`hrnet serve`: run the inference server until SIGTERM or Ctrl-C, then drain and exit 0.

    hrnet serve --model model.onnx                 # one model, named after the file
    hrnet serve --repo models/ --port 8001 --metrics-port 8002
    hrnet serve --config server.yaml               # any ServerConfig field; flags and HRNET_* win

Every flag has an `HRNET_<NAME>` environment variable (see serving/config.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

from core.errors import CommandError
from serving.config import ConfigError, ServerConfig, load_server_config
from serving.errors import ModelLoadError
from serving.logs import configure
from serving.server import Server

log = logging.getLogger(__name__)

# flag -> (config path, type, help). Flags default to None so only those given override.
FLAGS: dict[str, tuple[tuple[str, ...], type, str]] = {
    "--repo": (("repo",), str, "model repository: REPO/<model>/<version>/model.onnx|model.mindir"),
    "--model": (("model",), str, "serve this one model file instead of a repository"),
    "--model-name": (("model_name",), str, "name for --model (default: the file's stem)"),
    "--host": (("host",), str, "address to listen on (default 0.0.0.0)"),
    "--port": (("port",), int, "gRPC port (default 8001; 0 picks a free one)"),
    "--metrics-port": (("metrics_port",), int, "Prometheus port (default 8002; -1 disables)"),
    "--max-message-mb": (("max_message_mb",), int, "gRPC message limit in MiB (default 64)"),
    "--grace-period": (("grace_period_s",), float, "seconds to finish accepted work on SIGTERM (default 30)"),
    "--preprocess-workers": (("preprocess_workers",), int, "image decoding threads (default: cores, max 4)"),
    "--log-format": (("log_format",), str, "json or text (default json)"),
    "--log-level": (("log_level",), str, "debug, info, warning (default info)"),
    "--backend": (("model_defaults", "backend"), str, "auto, onnxruntime, mindspore_lite or mindspore"),
    "--device": (("model_defaults", "device"), str, "cpu, gpu or ascend (default cpu)"),
    "--instances": (
        ("model_defaults", "instances"),
        int,
        "model instances executing concurrently (default 1)",
    ),
    "--threads": (
        ("model_defaults", "threads_per_instance"),
        int,
        "intra-op threads per instance (default cores/instances)",
    ),
    "--max-batch-size": (("model_defaults", "batching", "max_batch_size"), int, "largest batch (default 16)"),
    "--max-queue-delay-us": (
        ("model_defaults", "batching", "max_queue_delay_us"),
        int,
        "batching wait (default 2000)",
    ),
    "--max-queue-size": (
        ("model_defaults", "batching", "max_queue_size"),
        int,
        "queued images before RESOURCE_EXHAUSTED (default 256)",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="server YAML file with ServerConfig fields")
    for flag, (_, kind, text) in FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, help=text)


def flags_to_config(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for flag, (path, _, _) in FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        if path == ("max_message_mb",):
            path, value = ("max_message_bytes",), value << 20
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def run(args: argparse.Namespace) -> int:
    try:
        config = load_server_config(args.config, os.environ, flags_to_config(args))
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    configure(config.log_format, config.log_level)
    try:
        return asyncio.run(serve(config))
    except ModelLoadError as exc:
        raise CommandError(str(exc)) from None


async def serve(config: ServerConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = Server(config)
    await server.start()
    await stop.wait()
    log.info("signal received: draining", extra={"grace_period_s": config.grace_period_s})
    drained = await server.stop()
    return 0 if drained else 1
