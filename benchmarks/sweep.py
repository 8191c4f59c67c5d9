"""A sweep: the same workload at each level against each target, levels interleaved across targets.

Interleaving (level 1 on every server, then level 2, ...) spreads a shared machine's changing
background load over all servers alike, so their ratios hold even when absolute figures drift.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from benchmarks.ceiling import Ceiling
from benchmarks.loadgen import Level, LoadGenerator, Measured, Workload, in_turn
from benchmarks.protocol import KSERVE, ModelInfo
from benchmarks.protocol import api as make_api
from benchmarks.targets import Target, gpu_probe, window_probes
from clients.images import find_images
from core.errors import CommandError

SYNTHETIC_REQUESTS = 8  # distinct random tensors, cycled
MAX_IMAGE_REQUESTS = 64  # distinct image requests kept in memory, cycled


@dataclass(frozen=True)
class WorkloadSpec:
    """The requests of a load, as the command line states them."""

    api: str = KSERVE
    images: Path | None = None  # a folder of encoded images (server-side decoding); None: FP32 tensors
    images_per_request: int = 1
    streaming: bool = False
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.images_per_request < 1:
            raise CommandError(f"--images-per-request must be >= 1, got {self.images_per_request}")
        if self.timeout_s <= 0:
            raise CommandError(f"--timeout must be > 0, got {self.timeout_s}")

    def build(self, model: ModelInfo) -> Workload:
        api = make_api(self.api)
        n = self.images_per_request
        if self.images is None:
            rng = np.random.default_rng(0)
            requests = [
                api.tensor_request(model, rng.standard_normal((n, *model.input_shape), dtype=np.float32))
                for _ in range(SYNTHETIC_REQUESTS)
            ]
        else:
            files = find_images([self.images])
            if not files:
                raise CommandError(f"no images found in {self.images}")
            count = max(1, min(MAX_IMAGE_REQUESTS, len(files) // n))
            data = [files[i % len(files)].read_bytes() for i in range(count * n)]
            requests = [api.images_request(model, data[i * n : (i + 1) * n]) for i in range(count)]
        return Workload(self.api, self.streaming, tuple(requests), n, self.timeout_s)

    def describe(self, model: ModelInfo) -> dict[str, Any]:
        shape = [self.images_per_request, *model.input_shape]
        return {
            "api": self.api,
            "input": f"encoded images from {self.images}" if self.images else f"random FP32 tensor {shape}",
            "images_per_request": self.images_per_request,
            "streaming": self.streaming,
            "model": model.name,
        }


def levels(
    concurrency: Sequence[int], rates: Sequence[float], warmup_s: float, duration_s: float, requests: int
) -> list[Level]:
    """Closed-loop levels, then open-loop ones, each with the same warm-up and measurement."""
    try:
        return [
            *(
                Level(concurrency=c, warmup_s=warmup_s, duration_s=duration_s, requests=requests)
                for c in concurrency
            ),
            *(Level(rate=r, warmup_s=warmup_s, duration_s=duration_s, requests=requests) for r in rates),
        ]
    except ValueError as exc:
        raise CommandError(str(exc)) from None


@dataclass(frozen=True)
class LevelResult:
    concurrency: int  # closed loop; 0 for open loop
    rate: float  # open loop, offered requests/s; 0 for closed loop
    img_s: float
    req_s: float
    ok: int
    errors: dict[str, int]
    window_s: float
    mean_ms: float | None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    p999_ms: float | None
    max_ms: float | None
    queue_ms: float | None  # the server's own split, from ModelStatistics
    compute_ms: float | None
    mean_batch: float | None
    batch_sizes: dict[int, int] | None  # executions per batch size over the window
    server_cpu: float | None  # cores; only for servers started here
    # img/s per core the server used: what it made of the CPU it got, comparable with the
    # ceiling's on a shared machine where the share each process gets varies from level to level
    img_per_cpu_s: float | None
    loadgen_cpu: float  # cores the load generator used
    ratio_to_ceiling: float | None
    cdf_ms: tuple[tuple[float, float], ...] = ()
    gpu: tuple[dict[str, float], ...] = ()  # per device over the window, where NVML finds a GPU here
    steal: float | None = None  # share of the machine's CPU time the hypervisor took (/proc/stat)

    @property
    def level(self) -> Level:
        return Level(concurrency=self.concurrency, rate=self.rate)

    @classmethod
    def of(cls, measured: Measured, ceiling_img_s: float | None) -> LevelResult:
        lat = measured.latency
        server = measured.server
        img_s = measured.img_s
        return cls(
            concurrency=measured.level.concurrency,
            rate=measured.level.rate,
            img_s=img_s,
            req_s=measured.req_s,
            ok=measured.ok,
            errors=measured.errors,
            window_s=measured.window_s,
            mean_ms=lat.mean_ms if lat else None,
            p50_ms=lat.p50_ms if lat else None,
            p90_ms=lat.p90_ms if lat else None,
            p99_ms=lat.p99_ms if lat else None,
            p999_ms=lat.p999_ms if lat else None,
            max_ms=lat.max_ms if lat else None,
            queue_ms=server.get("queue_ms"),
            compute_ms=server.get("compute_ms"),
            mean_batch=server.get("mean_batch"),
            batch_sizes=dict(sorted(server["batch_sizes"].items())) if "batch_sizes" in server else None,
            server_cpu=server.get("server_cpu"),
            img_per_cpu_s=img_s / server["server_cpu"] if server.get("server_cpu") else None,
            loadgen_cpu=measured.loadgen_cpu,
            ratio_to_ceiling=img_s / ceiling_img_s if ceiling_img_s else None,
            cdf_ms=lat.cdf_ms if lat else (),
            gpu=tuple(server.get("gpu", ())),
            steal=server.get("steal"),
        )


@dataclass
class TargetResult:
    label: str
    address: str
    model: str
    settings: dict[str, Any]
    levels: list[LevelResult] = field(default_factory=list)

    @property
    def saturation(self) -> LevelResult | None:
        """The level with the highest throughput: where the server saturates."""
        return max(self.levels, key=lambda lv: lv.img_s, default=None)

    def as_dict(self) -> dict[str, Any]:
        best = self.saturation
        headline = {
            "img_s": best.img_s if best else None,
            "ratio_to_ceiling": best.ratio_to_ceiling if best else None,
            "saturation_level": best.level.label if best else None,
        }
        return {**dataclasses.asdict(self), **headline}


def run(
    generator: LoadGenerator,
    targets: Sequence[Target],
    workloads: dict[str, Workload],
    levels: Sequence[Level],
    ceiling: Ceiling | None,
) -> list[TargetResult]:
    """Every level against every target, interleaved, the targets' order swapped from level to
    level (`in_turn`); ratios against the ceiling's best img/s."""
    results = {t.label: TargetResult(t.label, t.address, t.model.name, t.settings) for t in targets}
    for target in targets:
        generator.add_target(target.label, target.address, workloads[target.label])
    ceiling_img_s = ceiling.best.img_s if ceiling else None
    with gpu_probe() as gpus, tqdm(total=len(levels) * len(targets), unit="level", disable=None) as bar:
        for turn, level in enumerate(levels):
            for target in in_turn(targets, turn):
                bar.set_description(f"{target.label}, {level.label}")
                probes = window_probes(target, gpus)
                result = LevelResult.of(generator.run(target.label, level, probes), ceiling_img_s)
                results[target.label].levels.append(result)
                bar.update()
                p99 = f"{result.p99_ms:.0f}" if result.p99_ms is not None else "-"
                # A line per level, above the bar on a terminal and alone in a log file.
                tqdm.write(
                    f"{target.label}, {level.label}: {result.img_s:.1f} img/s, p99 {p99} ms", sys.stderr
                )
    return list(results.values())
