"""The machine a figure was measured on, printed and stored with every figure.

The same export ran about 3x faster on an AVX-512 machine than on an AVX2-only one of the same
cloud type, and other jobs on a shared machine halve it again: a figure without its CPU, its
vector width and the load at the time cannot be compared with anything.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# Widest first: the first flag found names the vector width the kernels can use.
VECTOR_FLAGS = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("asimd", "NEON"))


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    vector_isa: str  # "AVX-512", "AVX2", ... or "" when unknown
    gpu: str  # "" when there is none
    load_1m: float  # the 1-minute load average when the run started: > 0.5 x cores means shared
    onnxruntime: str
    python: str

    def describe(self) -> str:
        isa = f", {self.vector_isa}" if self.vector_isa else ""
        gpu = self.gpu or "no GPU"
        return (
            f"{self.cpu} ({self.cores} cores{isa}), {gpu}, load average {self.load_1m:.1f} at start, "
            f"onnxruntime {self.onnxruntime or 'not installed'}, Python {self.python}"
        )


def this_machine() -> Machine:
    cpu, flags = _cpuinfo()
    isa = next((name for flag, name in VECTOR_FLAGS if flag in flags), "")
    return Machine(
        cpu=cpu or platform.processor() or platform.machine(),
        cores=os.cpu_count() or 1,
        vector_isa=isa,
        gpu=_gpus(),
        load_1m=os.getloadavg()[0],
        onnxruntime=_version("onnxruntime") or _version("onnxruntime-gpu"),
        python=platform.python_version(),
    )


def _cpuinfo() -> tuple[str, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "", set()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return fields.get("model name", ""), set(fields.get("flags", fields.get("Features", "")).split())


def _gpus() -> str:
    """`nvidia-smi`'s names and memory, e.g. "1 x NVIDIA H100 80GB HBM3 (81559 MiB)"; "" without one."""
    if shutil.which("nvidia-smi") is None:
        return ""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    names = [", ".join(part.strip() for part in line.split(",")) for line in out.splitlines() if line.strip()]
    if not names:
        return ""
    return f"{len(names)} x {names[0]}" if len(set(names)) == 1 else "; ".join(names)


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return ""
