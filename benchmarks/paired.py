"""The ratio at saturation with the machine's drift taken out: ceiling and server alternated.

On a shared machine the same computation drifts by 10% and more within a minute (W18-small-v1,
batch 16, in-process on the 2-core EPYC: 38.3-43.6 img/s in six 4 s windows), and a sweep
measures the ceiling minutes before it reaches its saturation level; the ceiling's best batch
size is also the luckiest of several short windows. `--paired N` measures N pairs after the sweep,
each the ceiling at its best batch size and the server at the saturation level over windows of
the same length, the order swapped from pair to pair so that a steady drift falls on both alike,
and reports the median of the N ratios beside the sweep's.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Any

from tqdm import tqdm

from benchmarks.ceiling import Ceiling, measure
from benchmarks.loadgen import Level, LoadGenerator
from benchmarks.sweep import TargetResult
from benchmarks.targets import Target


@dataclass(frozen=True)
class Pair:
    ceiling_img_s: float
    server_img_s: float
    server_first: bool

    @property
    def ratio_to_ceiling(self) -> float:
        return self.server_img_s / self.ceiling_img_s


def saturation_level(result: TargetResult, levels: list[Level]) -> Level:
    """The sweep's level (with its warm-up and window) where `result` saturated."""
    best = result.saturation
    assert best is not None, "a sweep measures at least one level"
    return next(lv for lv in levels if lv.label == best.level.label)


def measure_pairs(
    generator: LoadGenerator, target: Target, level: Level, ceiling: Ceiling, pairs: int, seconds: float
) -> dict[str, Any]:
    """`pairs` alternated (ceiling for `seconds`, server at `level`) measurements."""
    assert target.model_file is not None
    model_file = target.model_file
    batch = ceiling.best.batch
    measured: list[Pair] = []
    for i in tqdm(range(pairs), desc=f"paired with the ceiling, {level.label}", unit="pair", disable=None):
        server_first = i % 2 == 1
        if server_first:
            served = generator.run(target.label, level).img_s
        ceiling_img_s = measure(model_file, [batch], target.model_config, seconds).best.img_s
        if not server_first:
            served = generator.run(target.label, level).img_s
        measured.append(Pair(ceiling_img_s, served, server_first))
        tqdm.write(f"pair {i + 1}: ceiling {ceiling_img_s:.1f}, server {served:.1f} img/s", sys.stderr)
    ratios = [p.ratio_to_ceiling for p in measured]
    return {
        "target": target.label,
        "level": level.label,
        "batch": batch,
        "seconds": seconds,
        "pairs": [{**asdict(p), "ratio_to_ceiling": p.ratio_to_ceiling} for p in measured],
        "ratio_to_ceiling": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }
