"""The servers a benchmark drives, and what is read from them while it does.

A target is ours started here (`--model` / `--repo`, on 127.0.0.1, through `hrnet serve` as a
user runs it) or any KServe v2 server already running (`--url`). Around every measured window
the server's own ModelStatistics are read, so a report splits each request's time into
queueing and compute and gives the batch sizes the server really ran; a server we started also
has its CPU use read, which says whether it or the machine was the limit.
"""

from __future__ import annotations

import contextlib
import shlex
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from benchmarks.loadgen import Probe
from benchmarks.protocol import ModelInfo, fetch_model_info, server_name
from core.errors import CommandError
from core.nvml import Nvml
from protos import grpc_service_pb2 as kpb
from protos.grpc_service_pb2_grpc import GRPCInferenceServiceStub as Stub
from serving.config import ModelConfig
from serving.engine.repository import default_model_name, model_names, scan_model
from serving.errors import ModelLoadError
from serving.process import ServerExited, ServerProcess

START_TIMEOUT_S = 300.0  # a W48 export on a busy CPU takes a while to load


@dataclass(frozen=True)
class ServerSource:
    """Where the server under test comes from: exactly one of url, model, repo (url may add model)."""

    url: str = ""  # a running server; `model` then only names its file, for the ceiling
    model: Path | None = None
    repo: Path | None = None
    model_name: str = ""

    def __post_init__(self) -> None:
        if bool(self.url) + bool(self.model and not self.url) + bool(self.repo) != 1:
            raise CommandError("give one of --url (a running server), --model FILE or --repo DIR")
        if self.model and not self.model.is_file():
            raise CommandError(f"model file {self.model} does not exist")
        if self.repo and not self.repo.is_dir():
            raise CommandError(f"model repository {self.repo} is not a directory")

    def serve_args(self) -> list[str]:
        if self.repo:
            return ["--repo", str(self.repo)]
        assert self.model is not None
        name = ["--model-name", self.model_name] if self.model_name else []
        return ["--model", str(self.model), *name]

    def served(self, served_name: str, defaults: ModelConfig) -> tuple[Path | None, ModelConfig]:
        """The file the server runs and how: `--model` with `defaults`, or the newest version of
        `--repo` its version policy serves, with its config.yaml over `defaults`, as the server reads it.
        """
        if not self.repo:
            return self.model, defaults
        try:
            model_names(self.repo)  # the repository itself must be there
        except ModelLoadError as exc:
            raise CommandError(str(exc)) from None
        folder = scan_model(self.repo, served_name, defaults)
        loadable = [v for v in folder.wanted() if v in folder.sources]
        if not loadable:
            return None, defaults
        newest = folder.sources[max(loadable, key=int)]
        return newest.path, newest.config


@dataclass(frozen=True)
class Target:
    label: str  # "hrnet serve", "MLServer 1.7.1", ...
    address: str
    model: ModelInfo
    pid: int | None = None  # a server we started, whose CPU time is read
    settings: dict[str, Any] = field(default_factory=dict)  # how it runs, stated in the report
    model_file: Path | None = None  # what the ceiling measures...
    model_config: ModelConfig = field(default_factory=ModelConfig)  # ...and how the server runs it


@contextlib.contextmanager
def hrnet_target(
    source: ServerSource, serve_flags: Sequence[str] = (), label: str = "hrnet serve", device: str = "cpu"
) -> Iterator[Target]:
    """The server at `source.url` (named as it names itself), or `hrnet serve` started on 127.0.0.1."""
    if source.url:
        model = fetch_model_info(source.url, source.model_name)
        name = server_name(source.url)
        settings = {"url": source.url, "server": name}
        yield Target(name, source.url, model, None, settings, source.model, ModelConfig(device=device))
        return
    args = [*source.serve_args(), "--metrics-port", "-1", "--log-format", "text", *serve_flags]
    with started(ServerProcess(args)) as server:
        name = source.model_name or (default_model_name(source.model) if source.model else "")
        model = fetch_model_info(server.address, name)
        settings = {"command": shlex.join(["hrnet", "serve", *args])}
        path, config = source.served(model.name, ModelConfig(device=device))
        yield Target(label, server.address, model, server.proc.pid, settings, path, config)  # type: ignore[union-attr]


@contextlib.contextmanager
def started(server: ServerProcess) -> Iterator[ServerProcess]:
    """Start `server` (a CommandError with its own reason if it cannot) and always stop it."""
    try:
        server.start(START_TIMEOUT_S)
    except ServerExited as exc:
        raise CommandError(str(exc)) from None
    try:
        yield server
    finally:
        server.stop()


class StatisticsProbe:
    """The server's ModelStatistics over the window: queue and compute time per request, mean batch.

    Servers without the statistics extension (MLServer) give nothing, and the report says so.
    """

    def __init__(self, address: str, model: str) -> None:
        self.address = address
        self.model = model
        self._before: kpb.ModelStatistics | None = None

    def _read(self) -> kpb.ModelStatistics | None:
        try:
            with grpc.insecure_channel(self.address) as channel:
                request = kpb.ModelStatisticsRequest(name=self.model)
                response = Stub(channel).ModelStatistics(request, timeout=10)
        except grpc.RpcError:
            return None
        # Several versions: add them up (the newest serves unversioned requests).
        total = kpb.ModelStatistics(name=self.model)
        for stats in response.model_stats:
            total.MergeFrom(kpb.ModelStatistics(batch_stats=stats.batch_stats))
            total.inference_count += stats.inference_count
            total.execution_count += stats.execution_count
            for name in ("queue", "compute_infer"):
                part, whole = getattr(stats.inference_stats, name), getattr(total.inference_stats, name)
                whole.count += part.count
                whole.ns += part.ns
        return total if response.model_stats else None

    def start(self) -> None:
        self._before = self._read()

    def stop(self) -> dict[str, Any]:
        after, before = self._read(), self._before
        if after is None or before is None:
            return {}
        figures: dict[str, Any] = {}
        for key, name in (("queue_ms", "queue"), ("compute_ms", "compute_infer")):
            a, b = getattr(after.inference_stats, name), getattr(before.inference_stats, name)
            if a.count > b.count:
                figures[key] = (a.ns - b.ns) / (a.count - b.count) / 1e6
        executions = after.execution_count - before.execution_count
        if executions > 0:
            figures["mean_batch"] = (after.inference_count - before.inference_count) / executions
            figures["batch_sizes"] = _batch_sizes(after) - _batch_sizes(before)
        return figures


def _batch_sizes(stats: kpb.ModelStatistics) -> Counter[int]:
    """Executions per batch size. A mean batch of 8 can be batches of 8, or of 15 and 1 in turn."""
    sizes: Counter[int] = Counter()
    for entry in stats.batch_stats:
        sizes[int(entry.batch_size)] += int(entry.compute_infer.count)
    return sizes


class StealProbe:
    """The share of this machine's CPU time that the hypervisor gave to other guests over the
    window: the steal column of /proc/stat. A virtual machine's neighbours can take most of its
    cores for minutes (this development VM's did: a digits tune read 900 img/s, then 50, with
    nothing changed but the steal), and a level measured then measures them, not the server."""

    PATH = Path("/proc/stat")

    def __init__(self) -> None:
        self._start: tuple[int, int] | None = None

    @classmethod
    def available(cls) -> bool:
        return cls._read() is not None

    @classmethod
    def _read(cls) -> tuple[int, int] | None:
        """(steal, all) jiffies of every CPU since boot; None where the kernel does not say."""
        try:
            fields = cls.PATH.read_text(encoding="ascii").split("\n", 1)[0].split()
        except OSError:
            return None
        if len(fields) < 9 or fields[0] != "cpu":
            return None
        jiffies = [int(f) for f in fields[1:9]]  # user nice system idle iowait irq softirq steal
        return jiffies[7], sum(jiffies)

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> dict[str, Any]:
        end = self._read()
        if self._start is None or end is None or end[1] <= self._start[1]:
            return {}
        return {"steal": (end[0] - self._start[0]) / (end[1] - self._start[1])}


class CpuProbe:
    """CPU cores a server process (and its worker processes) used over the window.

    psutil is imported here, not at the top: where it is missing (a bare GPU machine) the
    benchmark still runs, without this one figure.
    """

    def __init__(self, pid: int) -> None:
        import psutil

        self.psutil = psutil
        self.process = psutil.Process(pid)
        self._start: tuple[float, float] | None = None

    def _cpu_s(self) -> float:
        total = 0.0
        for proc in [self.process, *self.process.children(recursive=True)]:
            with contextlib.suppress(self.psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def start(self) -> None:
        self._start = (time.monotonic(), self._cpu_s())

    def stop(self) -> dict[str, Any]:
        if self._start is None:
            return {}
        elapsed = time.monotonic() - self._start[0]
        return {"server_cpu": (self._cpu_s() - self._start[1]) / elapsed} if elapsed > 0 else {}


class GpuProbe:
    """This machine's GPUs over the window, sampled every `interval_s` on a thread: mean utilization
    and power, peak memory and temperature per device. Only made where NVML finds a GPU."""

    def __init__(self, nvml: Nvml, interval_s: float = 0.25) -> None:
        self.nvml = nvml
        self.interval_s = interval_s
        self._samples: list[list[dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while True:
            self._samples.append(self.nvml.read())
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> None:
        self._samples, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._sample, name="hrnet-gpu-probe", daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        if self._thread is None:
            return {}
        self._stop.set()
        self._thread.join()
        devices = []
        for index, readings in enumerate(zip(*self._samples, strict=True)):
            summary: dict[str, float] = {"gpu": index}
            for name, reduce in GPU_SUMMARY.items():
                values = [r[name] for r in readings if name in r]
                if values:
                    summary[name] = reduce(values)
            devices.append(summary)
        return {"gpu": devices}


@contextlib.contextmanager
def gpu_probe() -> Iterator[GpuProbe | None]:
    """A probe of this machine's GPUs where NVML finds one, else None; NVML is closed after."""
    nvml, _ = Nvml.open()
    if nvml is None:
        yield None
        return
    try:
        yield GpuProbe(nvml)
    finally:
        nvml.close()


def window_probes(target: Target, gpus: GpuProbe | None) -> list[Probe]:
    """What is read around each measured window of `target`: its statistics, the CPU of a server
    started here (where psutil is installed), the CPU time the hypervisor took (where the kernel
    says) and this machine's GPUs (where NVML finds one)."""
    probes: list[Probe] = [StatisticsProbe(target.address, target.model.name)]
    if StealProbe.available():
        probes.append(StealProbe())
    if target.pid:
        with contextlib.suppress(ImportError):  # without psutil: no server CPU figure
            probes.append(CpuProbe(target.pid))
    return [*probes, *([gpus] if gpus else [])]


# How a window's samples of each NVML reading are summarized.
GPU_SUMMARY: dict[str, Callable[[list[float]], float]] = {
    "utilization": statistics.fmean,
    "memory_used_bytes": max,
    "power_watts": statistics.fmean,
    "temperature_celsius": max,
}
