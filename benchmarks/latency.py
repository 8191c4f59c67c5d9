"""Latency percentiles as every report states them.

Nearest rank, not interpolation: each percentile is a latency some request really had (the
smallest sample with at least q% of the samples at or below it), so p99.9 of 1,000 requests is
the slowest but one and a report never shows a latency nobody waited. This is what Triton's
perf_analyzer reports too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Where the stored CDF is sampled: every percent, then the tail that averages hide.
CDF_PERCENTS: tuple[float, ...] = (*range(100), 99.5, 99.9, 100)


def percentile(sorted_samples: Sequence[float] | np.ndarray, q: float) -> float:
    """The nearest-rank q-th percentile (0 < q <= 100) of samples sorted ascending; q=0 is the minimum."""
    n = len(sorted_samples)
    if n == 0:
        raise ValueError("no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    rank = max(1, math.ceil(q / 100 * n - 1e-9))  # 1e-9: 99.9 / 100 * 1000 is 999.0000000000001
    return float(sorted_samples[rank - 1])


@dataclass(frozen=True)
class LatencySummary:
    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    # [percent, ms] pairs at CDF_PERCENTS: enough to redraw the latency CDF from the JSON alone.
    cdf_ms: tuple[tuple[float, float], ...]

    @classmethod
    def of(cls, latencies_s: Sequence[float] | np.ndarray) -> LatencySummary | None:
        """Summary of latencies in seconds (reported in ms); None when there are none."""
        ms = np.sort(np.asarray(latencies_s, dtype=np.float64)) * 1e3
        if ms.size == 0:
            return None
        return cls(
            count=int(ms.size),
            mean_ms=float(ms.mean()),
            p50_ms=percentile(ms, 50),
            p90_ms=percentile(ms, 90),
            p99_ms=percentile(ms, 99),
            p999_ms=percentile(ms, 99.9),
            max_ms=float(ms[-1]),
            cdf_ms=tuple((float(q), percentile(ms, q)) for q in CDF_PERCENTS),
        )
