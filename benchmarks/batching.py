"""Throughput and latency with dynamic batching off and on, at one client concurrency.

Two `hrnet serve` processes on 127.0.0.1 serve the same file, one without batching
(`max_batch_size` 1, no delay) and one with it, and the shared load generator alternates the
same closed-loop level between them `repeats` times: a shared machine's background load falls
on both alike, and the medians compare the settings, not the moments.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from benchmarks.sweep import TargetResult

OFF_FLAGS = ("--max-batch-size", "1", "--max-queue-delay-us", "0")


def on_flags(max_batch_size: int, max_queue_delay_us: int) -> tuple[str, ...]:
    return ("--max-batch-size", str(max_batch_size), "--max-queue-delay-us", str(max_queue_delay_us))


def summarize(results: Sequence[TargetResult], concurrency: int, repeats: int) -> dict[str, Any]:
    """Medians per setting over the repeats, and the speed-up of the second setting over the first."""

    def median(values: Sequence[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    settings = [
        {
            "label": r.label,
            "img_s": median([lv.img_s for lv in r.levels]),
            "runs_img_s": [lv.img_s for lv in r.levels],
            "p50_ms": median([lv.p50_ms for lv in r.levels]),
            "p99_ms": median([lv.p99_ms for lv in r.levels]),
            "mean_batch": median([lv.mean_batch for lv in r.levels]),
            "ratio_to_ceiling": median([lv.ratio_to_ceiling for lv in r.levels]),
        }
        for r in results
    ]
    off, on = settings[0]["img_s"], settings[1]["img_s"]
    return {
        "concurrency": concurrency,
        "repeats": repeats,
        "settings": settings,
        "gain": on / off if off else 0.0,
    }
