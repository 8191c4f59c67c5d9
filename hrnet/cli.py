"""The one `hrnet` command.

Subcommands live in the package they belong to and are imported only when invoked, so
`hrnet classify` works on a client-only install without MindSpore or onnxruntime, and a
missing extra is reported as an install hint instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass

from core import __version__
from core.errors import CommandError


@dataclass(frozen=True)
class Command:
    """Where a subcommand lives. The module defines `add_arguments(parser)` and `run(args) -> int`."""

    module: str
    extra: str
    help: str


OUR_PACKAGES = ("core", "protos", "training", "serving", "clients", "benchmarks", "hrnet")

COMMANDS: dict[str, Command] = {
    "info": Command("training.info", "train", "parameter and multiply-accumulate counts of an architecture"),
    "data": Command("training.digits", "train", "write the bundled handwritten-digits set as an ImageFolder"),
    "train": Command("training.train", "train", "train an HRNet classifier (single device or msrun)"),
    "eval": Command("training.evaluate", "train", "evaluate a checkpoint on an ImageFolder val set"),
    "export": Command("training.export", "train", "export a checkpoint to MINDIR / ONNX / AIR"),
    "convert": Command("training.convert", "train", "convert official PyTorch/timm HRNet weights"),
    "serve": Command("serving.cli", "serve", "run the inference server (gRPC and HTTP/REST)"),
    "classify": Command("clients.cli", "", "classify images through a running server"),
    "health": Command("clients.health", "", "exit 0 if a server's gRPC health service says SERVING"),
    "bench": Command(
        "benchmarks.cli", "serve,bench", "measure throughput, latency and accuracy through the server"
    ),
    "demo": Command("hrnet.demo", "serve,train", "the whole job end to end on the bundled digits set"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"usage: hrnet <command> [options]   (hrnet {__version__})", "", "commands:"]
    lines += [f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items()]
    lines += ["", "Run `hrnet <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    command = COMMANDS.get(name)
    if command is None:
        print(f"hrnet: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(command.module)
    except ModuleNotFoundError as exc:
        if exc.name and not exc.name.startswith(OUR_PACKAGES):
            hint = f"pip install 'hrnet[{command.extra}]'" if command.extra else "pip install hrnet"
            print(
                f"hrnet {name}: needs the package {exc.name!r}, not installed here ({hint})", file=sys.stderr
            )
            return 2
        raise
    parser = argparse.ArgumentParser(prog=f"hrnet {name}", description=command.help)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(module.run(args) or 0)
    except CommandError as exc:
        print(f"hrnet {name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"hrnet {name}: interrupted", file=sys.stderr)
        return 130
