"""MLServer (Seldon) serving the same ONNX file, with its adaptive batching, as a peer to compare with.

Set up as its documentation suggests for production: a custom runtime (`mlserver_runtime/`, a
plain onnxruntime session with all cores, like one `hrnet serve` instance), adaptive batching
with the same limits our server gets (`max_batch_size` requests, `max_batch_time` = our queue
delay), the default one parallel inference worker, and `debug` off (on, it logs every request).
It speaks the same Open Inference Protocol, so the same load generator drives it unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import grpc

from benchmarks.protocol import ModelInfo, fetch_model_info
from benchmarks.targets import Target, started
from core.atomic import atomic_write_text
from core.errors import CommandError
from protos import grpc_service_pb2 as kpb
from protos.grpc_service_pb2_grpc import GRPCInferenceServiceStub as Stub
from serving.process import ServerProcess, free_port

MLSERVER_VERSION = "1.7.1"
RUNTIME_DIR = Path(__file__).with_name("mlserver_runtime")
RUNTIME_CLASS = "hrnet_mlserver.OnnxImageClassifier"
INSTALL_TIMEOUT_S = 1800.0
PARALLEL_WORKERS = 1  # MLServer's default
MESSAGE_BYTES = 64 << 20  # as ours: 64 MiB
# MLServer 1.7.1's parallel workers die at start with uvloop >= 0.22 ("There is no current event
# loop", SeldonIO/MLServer#2286, unfixed in 1.7.1): the last uvloop it works with.
MLSERVER_PINS = ("uvloop==0.21.0",)


class PeerUnavailable(CommandError):
    """The peer cannot be installed here (no index, no wheel for this Python); the message says why."""


def requirements(device: str) -> list[str]:
    """MLServer and the same onnxruntime we run, so both servers execute the same kernels."""
    for package in ("onnxruntime", "onnxruntime-gpu"):
        try:
            ours = version(package)
            break
        except PackageNotFoundError:
            continue
    else:
        raise PeerUnavailable("onnxruntime is not installed here, so there is no version to match")
    runtime = "onnxruntime-gpu" if device == "gpu" else "onnxruntime"
    return [f"mlserver=={MLSERVER_VERSION}", f"{runtime}=={ours}", *MLSERVER_PINS]


def environment(peers_dir: Path, device: str = "cpu") -> Path:
    """MLServer's virtual environment: created under `peers_dir` once, reused while it matches."""
    wanted = requirements(device)
    venv = peers_dir / f"mlserver-{MLSERVER_VERSION}-{device}"
    stamp = venv / "hrnet-requirements.json"
    peers_dir.mkdir(parents=True, exist_ok=True)
    with open(peers_dir / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once install once, the second waits
        if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == wanted:
            return venv
        print(f"installing {' '.join(wanted)} into {venv} (once; takes minutes)", file=sys.stderr, flush=True)
        if not (venv / "bin" / "python").is_file():
            _run([sys.executable, "-m", "venv", str(venv)], "create a virtual environment")
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        _run([*pip, *wanted], f"install {' '.join(wanted)}")
        atomic_write_text(stamp, json.dumps(wanted) + "\n")
    return venv


def _run(command: list[str], what: str) -> None:
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PeerUnavailable(f"cannot {what}: {exc}") from None
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise PeerUnavailable(f"cannot {what}: {' / '.join(tail)}")


class MLServerProcess(ServerProcess):
    """`mlserver start FOLDER` with our settings written into FOLDER; ready when the model is."""

    name = "mlserver"

    def __init__(
        self,
        venv: Path,
        folder: Path,
        model_file: Path,
        model: ModelInfo,
        max_batch_size: int,
        max_batch_time_s: float,
        device: str,
    ) -> None:
        # PYTHONPATH replaced, not extended: MLServer's processes import our runtime and nothing of ours.
        super().__init__([], log_path=folder / "mlserver.log", env={"PYTHONPATH": str(RUNTIME_DIR)})
        self.venv = venv
        self.folder = folder
        self.model_name = model.name
        self.settings = {
            "debug": False,
            "host": self.host,
            "grpc_port": self.port,
            "http_port": free_port(self.host),
            "metrics_port": free_port(self.host),
            "grpc_max_message_length": MESSAGE_BYTES,
            "parallel_workers": PARALLEL_WORKERS,
            "metrics_dir": str(folder / ".metrics"),
            "environments_dir": str(folder / ".envs"),
        }
        shape = [-1, *model.input_shape]
        self.model_settings = {
            "name": model.name,
            "implementation": RUNTIME_CLASS,
            "parameters": {"uri": str(model_file.resolve()), "extra": {"device": device}},
            "max_batch_size": max_batch_size,
            "max_batch_time": max_batch_time_s,
            "inputs": [{"name": model.input_name, "datatype": "FP32", "shape": shape}],
        }
        atomic_write_text(folder / "settings.json", json.dumps(self.settings, indent=2))
        atomic_write_text(
            folder / model.name / "model-settings.json", json.dumps(self.model_settings, indent=2)
        )

    @property
    def command(self) -> list[str]:
        return [str(self.venv / "bin" / "mlserver"), "start", str(self.folder)]

    def probe(self, channel: grpc.Channel) -> bool:
        try:
            reply = Stub(channel).ModelReady(kpb.ModelReadyRequest(name=self.model_name), timeout=2)
        except grpc.RpcError:
            return False
        return bool(reply.ready)


@contextlib.contextmanager
def mlserver_target(
    model_file: Path,
    like: ModelInfo,
    max_batch_size: int,
    max_queue_delay_us: int,
    device: str,
    peers_dir: Path,
) -> Iterator[Target]:
    """MLServer on 127.0.0.1 serving `model_file` under the name and input of our server's model."""
    venv = environment(peers_dir, device)
    with tempfile.TemporaryDirectory(prefix="hrnet-mlserver-") as folder:
        server = MLServerProcess(
            venv, Path(folder), model_file, like, max_batch_size, max_queue_delay_us / 1e6, device
        )
        with started(server):
            model = fetch_model_info(server.address, like.name)
            settings = {
                "server": f"mlserver {MLSERVER_VERSION} ({' '.join(requirements(device))})",
                "runtime": f"benchmarks/peers/mlserver_runtime/hrnet_mlserver.py: {RUNTIME_CLASS}",
                "max_batch_size": max_batch_size,
                "max_batch_time_s": max_queue_delay_us / 1e6,
                "parallel_workers": PARALLEL_WORKERS,
                "debug": False,
            }
            yield Target(
                f"MLServer {MLSERVER_VERSION}", server.address, model, server.proc.pid, settings, model_file
            )  # type: ignore[union-attr]
