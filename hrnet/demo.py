"""`hrnet demo` (`make demo`): the whole job end to end on the bundled handwritten digits.

data -> train -> eval -> export (ONNX, MINDIR) -> serve -> classify -> score -> summary, each stage
through the same `hrnet` commands a user runs, in child processes, so the demo proves the
commands and not a private shortcut. Training is skipped when its inputs (config, data, code)
hash to the key stored next to the previous run. Whatever happens, the server is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tqdm import tqdm

import training
from clients import Client, ClientError
from core import __version__
from core.atomic import atomic_write_text
from core.errors import CommandError
from serving.process import ServerExited, ServerProcess
from training.runs import list_checkpoints

STAGES = ("data", "train", "eval", "export", "serve", "classify", "score", "summary")
CONFIG = Path(training.__file__).parent / "configs" / "hrnet_digits.yaml"
CACHE_FILE = "demo_cache.json"  # in the training run's folder: the key of the inputs it was trained from
MODEL_NAME = "digits"
SERVER_START_TIMEOUT_S = 120.0
STREAM_IN_FLIGHT = 32


class StageFailed(Exception):
    pass


@dataclass(frozen=True)
class Summary:
    val_images: int
    server_top1: float
    eval_top1: float
    images_per_s: float
    train_reused: bool
    server: str  # where it ran; stopped by the time the summary is printed
    onnx: str
    mindir: str
    seconds: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", type=Path, default=Path("runs/demo"), help="default: %(default)s")
    parser.add_argument("--config", type=Path, default=CONFIG, help="training config (default: hrnet_digits)")
    parser.add_argument("--retrain", action="store_true", help="train even when a previous result matches")


def run(args: argparse.Namespace) -> int:
    # SIGTERM (CI timeouts, `kill`) unwinds like Ctrl-C, so the server and any child are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    demo = Demo(args.work_dir.resolve(), args.config.resolve(), args.retrain)
    summary = demo.run()
    print(_format_summary(summary, args.work_dir))
    return 0


class Demo:
    def __init__(self, work: Path, config: Path, retrain: bool) -> None:
        if not config.is_file():
            raise CommandError(f"training config {config} not found")
        self.work = work
        self.config = config
        self.retrain = retrain
        self.data = work / "data"
        self.train_dir = work / "train"
        self.repo = work / "repo"
        self.onnx = self.repo / MODEL_NAME / "1" / "model.onnx"
        self.mindir = work / "export" / "model.mindir"
        self.stage_no = 0

    @contextlib.contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        self.stage_no += 1
        print(f"\n[{self.stage_no}/{len(STAGES)}] {name}: {what}", flush=True)
        started = time.monotonic()
        try:
            yield
        except (StageFailed, ServerExited, ClientError, OSError, ValueError) as exc:
            raise CommandError(f"stage {name!r} failed: {exc}") from exc
        print(
            f"[{self.stage_no}/{len(STAGES)}] {name}: done in {time.monotonic() - started:.1f} s", flush=True
        )

    def run(self) -> Summary:
        started = time.monotonic()
        self.work.mkdir(parents=True, exist_ok=True)
        with self.stage("data", f"handwritten digits as an ImageFolder in {self.data}"):
            self.write_data()
        with self.stage("train", f"hrnet train --config {self.config.name}"):
            ckpt, reused = self.train()
        with self.stage("eval", "hrnet eval on the val split (MindSpore, the reference figure)"):
            eval_top1 = self.evaluate(ckpt, reused)
        with self.stage("export", "hrnet export to ONNX and MINDIR"):
            self.export(ckpt, reused)
        server = ServerProcess(
            [
                "--repo", self.repo,
                "--metrics-port", "-1",
                "--log-format", "text",
                "--grace-period", "5",
            ],
            log_path=self.work / "server.log",
        )  # fmt: skip
        try:
            with self.stage("serve", f"hrnet serve --repo {self.repo} on {server.address}"):
                print(f"server log: {server.log_path}")
                server.start(SERVER_START_TIMEOUT_S)
            with Client(server.address, timeout_s=60) as client:
                with self.stage("classify", "hrnet classify on a few val images"):
                    _hrnet("classify", *self.sample_images(), "--server", server.address, "--top-k", "3")
                with self.stage(
                    "score", f"the whole val split through the server ({STREAM_IN_FLIGHT} in flight)"
                ):
                    n, top1, rate = self.score(client)
        finally:
            code = server.stop()
            if code is not None:
                print(f"server stopped (exit {code})", flush=True)
        with self.stage("summary", f"written to {self.work / 'summary.json'}"):
            summary = Summary(
                val_images=n,
                server_top1=top1,
                eval_top1=eval_top1,
                images_per_s=rate,
                train_reused=reused,
                server=server.address,
                onnx=str(self.onnx),
                mindir=str(self.mindir),
                seconds=round(time.monotonic() - started, 1),
            )
            atomic_write_text(self.work / "summary.json", json.dumps(asdict(summary), indent=2) + "\n")
        return summary

    # --- stages ----------------------------------------------------------------------------

    def write_data(self) -> None:
        from training.digits import LABELS_FILE, write_digits

        if (self.data / LABELS_FILE).is_file():  # written last: the set is complete
            print(f"reusing {self.data}")
            return
        write_digits(self.data)

    def train(self) -> tuple[Path, bool]:
        """The final checkpoint, trained now or reused when the inputs hash to the stored key."""
        key = self.cache_key()
        cache = self.train_dir / CACHE_FILE
        previous = json.loads(cache.read_text(encoding="utf-8")) if cache.is_file() else {}
        ckpt = Path(previous.get("checkpoint", ""))
        if not self.retrain and previous.get("key") == key and ckpt.is_file():
            print(f"reusing {ckpt}: config, data and code are unchanged (key {key[:12]})")
            return ckpt, True
        # A stale run would be resumed or keep its old best checkpoint: start from nothing.
        shutil.rmtree(self.train_dir, ignore_errors=True)
        _hrnet(
            "train",
            "--config", self.config,
            "--data-path", self.data / "train",
            "--eval-data-path", "",  # evaluated once, by the eval stage
            "--output-dir", self.train_dir,
        )  # fmt: skip
        checkpoints = list_checkpoints(self.train_dir)
        if not checkpoints:
            raise StageFailed(f"hrnet train finished without writing a checkpoint in {self.train_dir}")
        ckpt = checkpoints[-1][1]
        atomic_write_text(cache, json.dumps({"key": key, "checkpoint": str(ckpt)}) + "\n")
        return ckpt, False

    def cache_key(self) -> str:
        """Hash of everything the trained weights depend on: config, images, training code."""
        digest = hashlib.sha256()
        digest.update(self.config.read_bytes())
        for path in sorted(self.data.rglob("*")):
            if path.is_file():
                digest.update(str(path.relative_to(self.data)).encode())
                digest.update(path.read_bytes())
        code = Path(training.__file__).parent
        for path in sorted(code.rglob("*.py")):
            digest.update(path.read_bytes())
        digest.update(__version__.encode())
        digest.update(_package_version("mindspore").encode())
        return digest.hexdigest()

    def evaluate(self, ckpt: Path, reused: bool) -> float:
        """`hrnet eval`'s top-1; a reused checkpoint keeps the figure measured on it before."""
        result = self.work / "eval.json"
        previous = json.loads(result.read_text(encoding="utf-8")) if result.is_file() else {}
        if reused and previous.get("ckpt") == str(ckpt):
            print(f"reusing {result}: the checkpoint is unchanged")
        else:
            _hrnet(
                "eval", "--ckpt", ckpt, "--data", self.data / "val", "--num-workers", "2", "--json", result
            )
        return float(json.loads(result.read_text(encoding="utf-8"))["Top_1_Acc"])

    def export(self, ckpt: Path, reused: bool) -> None:
        """Both formats, unless a reused checkpoint's exports are already there and newer than it."""
        for fmt, out in (("ONNX", self.onnx), ("MINDIR", self.mindir)):
            if reused and out.is_file() and out.stat().st_mtime >= ckpt.stat().st_mtime:
                print(f"reusing {out}: the checkpoint is unchanged")
                continue
            _hrnet("export", "--ckpt", ckpt, "--format", fmt, "--out", out, "--force")

    def sample_images(self) -> list[str]:
        """The first val image of three classes."""
        classes = sorted(p for p in (self.data / "val").iterdir() if p.is_dir())[:3]
        return [str(sorted(c.glob("*.png"))[0]) for c in classes]

    def score(self, client: Client) -> tuple[int, float, float]:
        """Top-1 over the val split through ClassifyStream: (images, top-1, images/s)."""
        images = sorted((self.data / "val").rglob("*.png"))
        truth = [p.parent.name for p in images]
        correct = 0
        started = time.perf_counter()
        stream = client.classify_stream(images, top_k=1, model=MODEL_NAME, max_in_flight=STREAM_IN_FLIGHT)
        for result in tqdm(stream, total=len(images), unit="img", file=sys.stdout):
            if result.classification is None:
                raise StageFailed(f"{images[result.index]}: {result.error}")
            correct += result.classification.label == truth[result.index]
        seconds = time.perf_counter() - started
        return len(images), correct / len(images), len(images) / seconds


def _format_summary(s: Summary, work: Path) -> str:
    lines = [
        "",
        "demo summary",
        f"  val images              {s.val_images}",
        f"  val top-1 via server    {s.server_top1:.4f}   (ONNX Runtime; PNGs preprocessed by the server)",
        f"  val top-1 hrnet eval    {s.eval_top1:.4f}   (MindSpore, same checkpoint)",
        f"  throughput              {s.images_per_s:.1f} images/s ({STREAM_IN_FLIGHT} in flight)",
        f"  training                {'reused (inputs unchanged)' if s.train_reused else 'trained now'}",
        f"  exports                 {s.onnx}",
        f"                          {s.mindir}",
        f"  wall time               {s.seconds:.0f} s   (summary in {work / 'summary.json'})",
    ]
    return "\n".join(lines)


def _hrnet_command(*args: object) -> list[str]:
    return [sys.executable, "-m", "hrnet", *map(str, args)]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # child output interleaves with the stage headers in order
    return env


def _hrnet(*args: object) -> None:
    """Run one `hrnet` command; its output goes straight to the terminal (progress bars included)."""
    command = _hrnet_command(*args)
    print("$ " + shlex.join(["hrnet", *command[3:]]), flush=True)
    code = subprocess.run(command, env=_child_env(), check=False).returncode
    if code != 0:
        raise StageFailed(f"`hrnet {args[0]}` exited with {code} (its output is above)")


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return ""
