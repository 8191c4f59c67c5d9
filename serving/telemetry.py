"""What the machine spends on the server, on the metrics port beside the request metrics.

- CPU seconds by process role (`hrnet_process_cpu_seconds_total{role="owner"|"frontend",worker}`),
  read from /proc when scraped: the owner's share per request shows in production, not only in
  `hrnet bench overhead`. Nothing is counted per request.
- GPUs through NVML, NVIDIA's own bindings (`nvidia-ml-py`, in the gpu extra): utilization,
  memory used and total, power and temperature per device (`gpu` label: its index), sampled
  every `gpu_metrics_interval_s` on a thread. Without the bindings, the library or a device there
  are no GPU metrics and one info line, never an error.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import Gauge
from prometheus_client.core import CounterMetricFamily

from core.nvml import Nvml

log = logging.getLogger(__name__)
# The GPU gauges by NVML reading: (metric name, help). Each has the label `gpu`, the device index.
GPU_GAUGES = {
    "utilization": ("hrnet_gpu_utilization", "GPU busy fraction (0..1), NVML"),
    "memory_used_bytes": ("hrnet_gpu_memory_used_bytes", "GPU memory in use, NVML"),
    "memory_total_bytes": ("hrnet_gpu_memory_total_bytes", "GPU memory, NVML"),
    "power_watts": ("hrnet_gpu_power_watts", "GPU power draw, NVML"),
    "temperature_celsius": ("hrnet_gpu_temperature_celsius", "GPU temperature, NVML"),
}
PROCESS_CPU = "hrnet_process_cpu_seconds"  # a counter: exported as ..._total
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of `pid` so far; None where /proc cannot tell (gone, not Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS


class ProcessCpu:
    """A Prometheus collector: the owner's CPU seconds and each front end's (`front_ends()`:
    index -> pid), read at scrape time. A replaced front end starts its counter again."""

    def __init__(self, front_ends: Callable[[], dict[int, int]]) -> None:
        self._front_ends = front_ends

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            PROCESS_CPU,
            "CPU seconds (user + system) spent by each process of the server, by role",
            labels=("role", "worker"),
        )
        processes = [("owner", "", os.getpid())]
        processes += [("frontend", str(i), pid) for i, pid in sorted(self._front_ends().items())]
        for role, worker, pid in processes:
            seconds = cpu_seconds(pid)
            if seconds is not None:
                family.add_metric((role, worker), seconds)
        yield family


class GpuTelemetry:
    """NVML sampled into gauges of `registry`; the gauges exist only once a GPU was found."""

    def __init__(self, registry: Any, interval_s: float) -> None:
        self.registry = registry
        self.interval_s = interval_s
        self._nvml: Nvml | None = None
        self._gauges: dict[str, Gauge] = {}

    def open(self) -> bool:
        """Find the GPUs; False (and one info line) where NVML or a GPU is missing."""
        if self.interval_s <= 0:
            return False
        self._nvml, reason = Nvml.open()
        if self._nvml is None:
            log.info("no GPU metrics: %s", reason)
            return False
        self._gauges = {
            reading: Gauge(name, text, ("gpu",), registry=self.registry)
            for reading, (name, text) in GPU_GAUGES.items()
        }
        log.info("GPU metrics on", extra={"gpus": self._nvml.count, "interval_s": self.interval_s})
        self.sample()
        return True

    def sample(self) -> None:
        if self._nvml is None:
            return
        for index, readings in enumerate(self._nvml.read()):
            for reading, value in readings.items():
                self._gauges[reading].labels(str(index)).set(value)

    async def run(self) -> None:
        """Sample every interval until cancelled (NVML calls block briefly: on a thread)."""
        while True:
            await asyncio.sleep(self.interval_s)
            await asyncio.to_thread(self.sample)

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None
