"""`hrnet serve`: run the inference server until SIGTERM or Ctrl-C, then drain and exit 0.

    hrnet serve --model model.onnx                 # one model, named after the file
    hrnet serve --repo models/ --port 8001 --http-port 8000 --metrics-port 8002
    hrnet serve --config server.yaml               # any ServerConfig field; flags and HRNET_* win
    hrnet serve --repo models/ --model-control poll --repository-poll-s 5   # follow the repository
    hrnet serve --repo models/ --model-control explicit --load-model w48    # RepositoryModelLoad the rest

Every flag has an `HRNET_<NAME>` environment variable (`--max-batch-size` is `HRNET_MAX_BATCH_SIZE`),
both generated from the fields of serving/config.py.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import NoReturn

from core.errors import CommandError
from core.settings import add_flags, flag_values
from serving import event_loop
from serving.api.rpc import exit_now
from serving.config import ConfigError, ServerConfig, load_server_config
from serving.engine.backends import backend_names
from serving.errors import StartError
from serving.logs import configure
from serving.server import Server

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="server YAML file with ServerConfig fields")
    backends = f"auto (by file type) or one of: {', '.join(backend_names())}"
    add_flags(
        parser,
        ServerConfig,
        "settings (each also HRNET_<NAME>, e.g. HRNET_MAX_BATCH_SIZE)",
        {"backend": backends},
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = load_server_config(args.config, os.environ, flag_values(args, ServerConfig))
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    configure(config.log_format, config.log_level)
    try:
        event_loop.run(serve(config), config.event_loop)
    except StartError as exc:
        raise CommandError(str(exc)) from None
    raise AssertionError("serve() ends the process itself")


async def serve(config: ServerConfig) -> NoReturn:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = Server(config)
    await server.start()
    await stop.wait()
    log.info("signal received: draining", extra={"grace_period_s": config.grace_period_s})
    drained = await server.drain()
    await server.plane.tracing.close()  # export the spans still pending; the process ends next
    exit_now(0 if drained else 1)
