"""The ceiling: the model file through the server's own backend, in this process, no server around it.

This is what the hardware gives that model with that runtime; a server can only lose from here
(gRPC, conversion, queueing). Every server figure is reported as a fraction of it, measured in
the same run, because on a shared or a different machine only the ratio means anything.
Several files side by side answer "what does fp16 / int8 buy on this device".
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from core.errors import CommandError
from serving.config import ModelConfig
from serving.engine.backends import Backend, open_backend
from serving.errors import ModelLoadError

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)
WARMUP_RUNS = 2  # the first runs allocate and pick kernels (on CUDA: the cuDNN algorithm search)
MIN_RUNS = 3


@dataclass(frozen=True)
class BatchTiming:
    batch: int
    runs: int
    img_s: float
    p50_ms: float  # one run of the whole batch
    min_ms: float
    max_ms: float
    cpu: float  # cores this process used meanwhile: on a shared machine, what it really got
    img_per_cpu_s: float  # img/s per core used: comparable with a server's on a shared machine


@dataclass(frozen=True)
class Ceiling:
    model: str
    backend: str  # the backend and its providers, as the server logs them
    device: str
    threads: int  # intra-op threads: the server's default for one instance
    batches: tuple[BatchTiming, ...]

    @property
    def best(self) -> BatchTiming:
        return max(self.batches, key=lambda b: b.img_s)

    def as_dict(self) -> dict[str, Any]:
        best = self.best
        return {**dataclasses.asdict(self), "best_img_s": best.img_s, "best_batch": best.batch}


def measure(
    path: Path, batch_sizes: Sequence[int], config: ModelConfig | None = None, seconds: float = 2.0
) -> Ceiling:
    """Best throughput of `path` per batch size: warm-up runs, then runs for `seconds` (at least 3).

    `config` is the served model's (backend, device, providers), run as one instance with all
    the cores: the most the hardware gives that file, whatever the server's instance split.
    """
    config = dataclasses.replace(config or ModelConfig(), instances=1, threads_per_instance=0)
    try:
        backend = open_backend(Path(path), config)
    except ModelLoadError as exc:
        raise CommandError(str(exc)) from None
    try:
        shape = _input_shape(backend)
        rng = np.random.default_rng(0)
        timings = []
        bar = tqdm(batch_sizes, desc=f"ceiling {Path(path).name}", unit="batch size", disable=None)
        for batch in bar:
            images = rng.standard_normal((batch, *shape)).astype(backend.input.dtype)  # type: ignore[union-attr]
            timings.append(_time_batch(backend, images, seconds))
            tqdm.write(f"ceiling, batch {batch}: {timings[-1].img_s:.1f} img/s", sys.stderr)
        return Ceiling(
            str(path), backend.describe(), config.device, config.intra_op_threads(), tuple(timings)
        )
    finally:
        backend.close()


def _input_shape(backend: Backend) -> tuple[int, ...]:
    """(C, H, W) of one image: from the file, or the model card where the file leaves H, W open."""
    assert backend.input is not None
    channels, height, width = backend.input.shape[1:]
    size = backend.metadata.input_size if backend.metadata else 0
    shape = (channels if channels > 0 else 3, height if height > 0 else size, width if width > 0 else size)
    if min(shape) < 1:
        raise CommandError(
            f"{backend.path}: the input size is not fixed in the file and there is no model card"
        )
    return shape


def _time_batch(backend: Backend, images: np.ndarray, seconds: float) -> BatchTiming:
    for _ in range(WARMUP_RUNS):
        backend.infer(images)
    runs: list[float] = []
    started, cpu_started = time.perf_counter(), time.process_time()
    while len(runs) < MIN_RUNS or time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        backend.infer(images)
        runs.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu_started) / (time.perf_counter() - started)
    batch = len(images)
    return BatchTiming(
        batch=batch,
        runs=len(runs),
        img_s=batch * len(runs) / sum(runs),
        p50_ms=statistics.median(runs) * 1e3,
        min_ms=min(runs) * 1e3,
        max_ms=max(runs) * 1e3,
        cpu=cpu,
        img_per_cpu_s=batch * len(runs) / sum(runs) / cpu if cpu > 0 else 0.0,
    )
