"""NVIDIA GPUs as NVML sees them, through NVIDIA's own bindings (`nvidia-ml-py`, module `pynvml`).

One reader for the server's metrics and the benchmarks' per-level GPU summary. Where the bindings,
the driver or a device is missing, `Nvml.open` says why instead of raising: GPU figures are
something to show when there is a GPU, never a reason to fail.
"""

from __future__ import annotations

import contextlib
from typing import Any

# What is read per device, in the units reported.
READINGS = ("utilization", "memory_used_bytes", "memory_total_bytes", "power_watts", "temperature_celsius")


class Nvml:
    def __init__(self, module: Any, handles: list[Any]) -> None:
        self._nvml = module
        self._handles = handles

    @classmethod
    def open(cls) -> tuple[Nvml | None, str]:
        """The GPUs, or None and the reason there are none to read."""
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # ImportError, or NVMLError where there is no driver
            return None, f"NVML is not available here ({exc})"
        count = pynvml.nvmlDeviceGetCount()
        if not count:
            pynvml.nvmlShutdown()
            return None, "NVML finds no GPU"
        return cls(pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]), ""

    @property
    def count(self) -> int:
        return len(self._handles)

    def read(self) -> list[dict[str, float]]:
        """Per device (by index), the READINGS it supports; utilization as a 0..1 fraction."""
        nvml = self._nvml
        devices = []
        for handle in self._handles:
            readers = {
                "utilization": lambda h=handle: nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100,
                "memory_used_bytes": lambda h=handle: nvml.nvmlDeviceGetMemoryInfo(h).used,
                "memory_total_bytes": lambda h=handle: nvml.nvmlDeviceGetMemoryInfo(h).total,
                "power_watts": lambda h=handle: nvml.nvmlDeviceGetPowerUsage(h) / 1000,  # milliwatts
                "temperature_celsius": lambda h=handle: nvml.nvmlDeviceGetTemperature(
                    h, nvml.NVML_TEMPERATURE_GPU
                ),
            }
            values: dict[str, float] = {}
            for name, read in readers.items():
                with contextlib.suppress(Exception):  # a reading a device does not support is left out
                    values[name] = float(read())
            devices.append(values)
        return devices

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._nvml.nvmlShutdown()
