"""`hrnet bench tune`: the serving configuration found by measurement, written where `hrnet serve` reads it.

Every candidate is one `hrnet serve` started on 127.0.0.1 with its settings, driven closed loop
with one image per request up a ladder of callers (1, 2, 4, ...) until its p99 misses the target
or its throughput stops rising, then once halfway between the last level that met the target and
the first that missed. Its score is its throughput at the target: the highest of a level that met
it, or, where the next level up missed it on latency, read off the line between the two.

Six settings with a handful of values each make thousands of combinations at half a minute
each, so the search is coordinate descent from the defaults: one setting at a time (precision,
then instances and threads, batch size, queue delay, front-end processes), each measured with
the best of the others found so far, then a refining pass on the batch size and the delay
around their best values. A candidate that does not beat the best by `TIE` keeps the incumbent,
and among ties the lower CPU per image wins. The best of many noisy readings reads high, so the
FINALISTS best, and the defaults with them, are measured once more, the choice made on the means
and the figures claimed for both taken from those second readings alone: they were not picked for
reading high, and they are the closest in time to the check. Before each
candidate the time it would take (the mean of those measured so far) is weighed against the
budget left after the confirmation and the final check; what does not fit is listed as skipped.

The final check is the claim itself: the default configuration and the written file (served by
`hrnet serve --config FILE`) measured again, alternated, by the same procedure, and then an
open loop of Poisson arrivals at `certify_shares` of the chosen throughput, the highest first,
until the p99 holds: the rate at which it holds is the rate the file is certified for. Every
measurement is appended to a cache as it finishes, so an interrupted tune continues where it
stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from benchmarks.arguments import floats, ints
from benchmarks.loadgen import Level, LoadGenerator
from benchmarks.machine import Machine, this_machine
from benchmarks.modes import command_line
from benchmarks.protocol import ModelInfo
from benchmarks.report import Report, at_target, best_level, meets
from benchmarks.sweep import LevelResult, WorkloadSpec
from benchmarks.targets import GpuProbe, ServerSource, Target, gpu_probe, hrnet_target, window_probes
from core.atomic import atomic_path, atomic_write_text
from core.errors import CommandError
from serving.config import BatchingConfig, ModelConfig, ServerConfig, usable_cores

TIE = 0.05  # throughputs closer than this are equal: same-run repeats here differ by a few percent
SATURATED_GAIN = 1.05  # a level that adds less than this has reached the server's capacity
FINALISTS = 3  # the best candidates of the search, measured once more before one is chosen
STEAL_LIMIT = 0.10  # of the CPU taken by the hypervisor during a level (1-2% when the VM is quiet)
STEAL_RETRIES = 2
SERVER_START_S = 5.0  # to start and stop one `hrnet serve` of a small model here, with margin
DEFAULT_LADDER = (1, 2, 4, 8, 16, 32, 64, 128)
CACHE_FILE = "measurements.jsonl"


@dataclass(frozen=True, order=True)
class Candidate:
    """One configuration, every setting stated (none left to the server's rules)."""

    precision: str
    workers: int  # front-end processes
    instances: int
    threads: int  # intra-op threads per instance
    max_batch_size: int
    max_queue_delay_us: int

    @property
    def key(self) -> str:
        return (
            f"{self.precision} w{self.workers} i{self.instances}x{self.threads} "
            f"b{self.max_batch_size} d{self.max_queue_delay_us}"
        )

    def settings(self) -> dict[str, Any]:
        """The ServerConfig fields this candidate sets, nested as in the YAML file."""
        return {
            "workers": self.workers,
            "model_defaults": {
                "instances": self.instances,
                "threads_per_instance": self.threads,
                "batching": {
                    "max_batch_size": self.max_batch_size,
                    "max_queue_delay_us": self.max_queue_delay_us,
                    "max_queue_size": max(BatchingConfig().max_queue_size, self.max_batch_size),
                },
            },
        }

    def flags(self) -> list[str]:
        batching = self.settings()["model_defaults"]["batching"]
        return [
            *("--workers", str(self.workers), "--instances", str(self.instances)),
            *("--threads", str(self.threads), "--max-batch-size", str(self.max_batch_size)),
            *("--max-queue-delay-us", str(self.max_queue_delay_us)),
            *("--max-queue-size", str(batching["max_queue_size"])),
        ]


def default_candidate(cores: int) -> Candidate:
    """What `hrnet serve --model M` runs on `cores` cores, resolved by the server's own rules
    (serving/config.py), so a candidate equal to it in effect is not measured twice."""
    model, batching = ModelConfig(), BatchingConfig()
    return Candidate(
        precision="fp32",
        workers=ServerConfig(model="m").front_ends(cores),
        instances=model.instances,
        threads=model.intra_op_threads(cores),
        max_batch_size=batching.max_batch_size,
        max_queue_delay_us=batching.max_queue_delay_us,
    )


@dataclass(frozen=True)
class TuneSettings:
    """How every candidate is measured, and how the result is checked."""

    p99_ms: float
    ladder: tuple[int, ...] = DEFAULT_LADDER
    warmup_s: float = 1.0
    duration_s: float = 4.0
    device: str = "cpu"
    certify_shares: tuple[float, ...] = (0.8, 0.6, 0.4)
    rounds: int = 3  # alternated re-measurements of the default and the chosen configuration

    def __post_init__(self) -> None:
        if self.p99_ms <= 0:
            raise CommandError(f"--p99-ms must be > 0, got {self.p99_ms}")
        if self.duration_s <= 0 or self.warmup_s < 0:
            raise CommandError("--duration must be > 0 and --warmup >= 0")
        if not all(0 < share <= 1 for share in self.certify_shares):
            raise CommandError(f"--certify-shares must be within (0, 1], got {list(self.certify_shares)}")
        if self.rounds < 1:
            raise CommandError(f"--rounds must be >= 1, got {self.rounds}")


@dataclass
class Measurement:
    """A candidate through a real server: its levels, and the best one under the target."""

    candidate: Candidate
    levels: list[dict[str, Any]]
    seconds: float  # wall time, server start included: what the budget is charged
    phase: str  # "search" or "verify"
    error: str = ""  # the server did not start: the reason

    def best(self, p99_ms: float) -> dict[str, Any] | None:
        return best_level(self.levels, p99_ms)

    def score(self, p99_ms: float) -> float:
        return at_target(self.levels, p99_ms)

    def cpu_ms(self, p99_ms: float) -> float:
        """Server CPU per image at the best level; infinite when unknown, so it never wins a tie."""
        best = self.best(p99_ms)
        return best["cpu_ms_per_img"] if best and best["cpu_ms_per_img"] is not None else float("inf")

    def as_dict(self) -> dict[str, Any]:
        return {
            "candidate": dataclasses.asdict(self.candidate),
            "key": self.candidate.key,
            "levels": self.levels,
            "seconds": self.seconds,
            "phase": self.phase,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        return cls(
            Candidate(**data["candidate"]), data["levels"], data["seconds"], data["phase"], data["error"]
        )


@dataclass(frozen=True)
class Figure:
    """What a candidate is chosen on: img/s at the p99 target and server CPU ms per image, the
    means of its readings."""

    img_s: float
    cpu_ms: float  # infinite when unknown, so it never wins a tie

    @classmethod
    def of(cls, readings: Sequence[Measurement], p99_ms: float) -> Figure:
        return cls(
            statistics.mean(m.score(p99_ms) for m in readings),
            statistics.mean(m.cpu_ms(p99_ms) for m in readings),
        )


def better(a: Figure, b: Figure) -> bool:
    """Whether `a` beats `b`: more than TIE more throughput, or as much for less CPU per image."""
    if a.img_s > b.img_s * (1 + TIE):
        return True
    return a.img_s >= b.img_s * (1 - TIE) and a.img_s > 0 and a.cpu_ms < b.cpu_ms


class Cache:
    """Search and confirming measurements of one model, workload, machine and measuring settings,
    a JSON line each; the check's are recorded too but never reused."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / CACHE_FILE
        self.found: dict[tuple[str, str], Measurement] = {}  # (phase, candidate key) -> measurement
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):  # a line cut by a kill
                    self._keep(Measurement.from_dict(json.loads(line)))

    def _keep(self, m: Measurement) -> None:
        if m.phase in ("search", "confirm"):
            self.found[m.phase, m.candidate.key] = m

    def add(self, measurement: Measurement) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(measurement.as_dict()) + "\n")
        self._keep(measurement)


def cache_folder(
    root: Path, model: Path, spec: WorkloadSpec, settings: TuneSettings, machine: Machine
) -> Path:
    """A folder per model file (by content), workload, measuring settings and machine."""
    digest = hashlib.sha256()
    with model.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    state = {
        "workload": [spec.api, str(spec.images), spec.images_per_request, spec.streaming],
        # what changes a candidate's figures; the check's rounds and open-loop shares do not
        "settings": [
            settings.p99_ms,
            settings.ladder,
            settings.warmup_s,
            settings.duration_s,
            settings.device,
        ],
        "machine": [machine.cpu, machine.cores, machine.gpu],
    }
    digest.update(json.dumps(state, sort_keys=True).encode())
    return root / f"{model.stem}-{digest.hexdigest()[:12]}"


# --- measuring ---------------------------------------------------------------------------------


def _level(result: LevelResult) -> dict[str, Any]:
    cpu_ms = 1000 * result.server_cpu / result.img_s if result.server_cpu and result.img_s else None
    return {
        "concurrency": result.concurrency,
        "rate": result.rate,
        "img_s": result.img_s,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "errors": result.errors,
        "mean_batch": result.mean_batch,
        "server_cpu": result.server_cpu,
        "cpu_ms_per_img": cpu_ms,
        "gpu": list(result.gpu),
        "steal": result.steal,
    }


class Bench:
    """The load generator and what every measurement shares: the model files, workload and settings."""

    def __init__(
        self,
        generator: LoadGenerator,
        files: dict[str, Path],
        spec: WorkloadSpec,
        settings: TuneSettings,
        default: Candidate,
        gpus: GpuProbe | None,
    ) -> None:
        self.generator = generator
        self.files = files  # precision -> model file
        self.spec = spec
        self.settings = settings
        self.default = default
        self.gpus = gpus
        self.model: ModelInfo | None = None  # as the first server described it
        self._targets = 0

    @contextlib.contextmanager
    def _serve(self, candidate: Candidate, config: Path | None) -> Iterator[tuple[str, Target]]:
        """`hrnet serve --config FILE`, or with the candidate's flags, or with none for the defaults."""
        if config:
            flags = ["--config", str(config)]
        else:
            flags = [] if candidate == self.default else candidate.flags()
        if self.settings.device != "cpu":
            flags += ["--device", self.settings.device]
        source = ServerSource(model=self.files[candidate.precision])
        with hrnet_target(source, flags, candidate.key, self.settings.device) as target:
            self._targets += 1
            key = f"{candidate.key} #{self._targets}"
            self.model = self.model or target.model
            self.generator.add_target(key, target.address, self.spec.build(target.model))
            yield key, target

    def _run(self, key: str, target: Target, level: Level) -> dict[str, Any]:
        """One level, measured again (up to STEAL_RETRIES times) while the hypervisor took more
        than STEAL_LIMIT of the machine's CPU during it: such a reading measures the neighbours."""
        for attempt in range(STEAL_RETRIES + 1):
            probes = window_probes(target, self.gpus)
            result = _level(LevelResult.of(self.generator.run(key, level, probes), None))
            result["remeasured"] = attempt
            if (result["steal"] or 0.0) <= STEAL_LIMIT:
                break
            tqdm.write(
                f"{level.label}: the hypervisor took {result['steal']:.0%} of the CPU"
                + (", measured again" if attempt < STEAL_RETRIES else ", kept as it is"),
                sys.stderr,
            )
        return result

    def closed_loop(
        self, candidate: Candidate, phase: str, config: Path | None = None, start: int = 1
    ) -> Measurement:
        """The ladder climbed from `start` until the p99 misses the target, errors appear or
        throughput stops rising; down from `start` if even it misses. Between the last level that
        met the target and the first that missed, one more halfway (geometrically): the score is
        the throughput at the target, and a ladder of doublings alone reads it a factor 2 coarse."""
        s = self.settings
        began = time.monotonic()
        levels: list[dict[str, Any]] = []
        try:
            with self._serve(candidate, config) as (key, target):

                def run(concurrency: int) -> bool:
                    level = Level(concurrency=concurrency, warmup_s=s.warmup_s, duration_s=s.duration_s)
                    levels.append(self._run(key, target, level))
                    return meets(levels[-1], s.p99_ms)

                met, missed = climb(s.ladder, run, levels, start)
                if met is not None and missed is not None and (mid := midway(met, missed)):
                    run(mid)
        except CommandError as exc:  # the server refused the settings or could not start
            return Measurement(candidate, levels, time.monotonic() - began, phase, str(exc))
        return Measurement(candidate, levels, time.monotonic() - began, phase)

    def open_loop(
        self, candidate: Candidate, rates: Sequence[float], config: Path | None = None
    ) -> list[dict[str, Any]]:
        """Poisson arrivals at each of `rates` images/s in turn, twice the duration each, on one
        server, until the p99 meets the target without errors."""
        s = self.settings
        levels: list[dict[str, Any]] = []
        with self._serve(candidate, config) as (key, target):
            for rate in rates:
                level = Level(
                    rate=rate / self.spec.images_per_request,
                    warmup_s=max(s.warmup_s, 1.0),
                    duration_s=2 * s.duration_s,
                )
                levels.append(self._run(key, target, level))
                if best_level(levels[-1:], s.p99_ms):
                    break
        return levels


# --- the search --------------------------------------------------------------------------------

Change = dict[str, int | str]


def axes(cores: int, device: str, precisions: Sequence[str]) -> list[tuple[str, list[Change]]]:
    """The coarse pass: (setting, the values tried), in the order they are tuned. On a CPU the
    instances share the cores; on an accelerator each instance is another stream of work for it."""
    if device == "cpu":
        shares = [1, 2, *([cores] if cores >= 4 else [])]
        parallel: list[Change] = [{"instances": n, "threads": max(1, cores // n)} for n in shares]
    else:
        parallel = [{"instances": n, "threads": max(1, cores // n)} for n in (1, 2, 4)]
    return [
        ("precision", [{"precision": p} for p in precisions]),
        ("instances x threads", parallel),
        ("max batch size", [{"max_batch_size": b} for b in (1, 4, 16, 64)]),
        ("max queue delay", [{"max_queue_delay_us": d} for d in (0, 500, 2000, 8000)]),
        ("front-end processes", [{"workers": w} for w in sorted({1, 2, *(n for n in (4, 8) if n <= cores)})]),
    ]


def climb(
    ladder: Sequence[int], run: Callable[[int], bool], levels: list[dict[str, Any]], start: int
) -> tuple[int | None, int | None]:
    """`run` (which appends a level to `levels`, and says whether it met the target) up the
    ladder from the highest value not above `start`, and down from there if even that missed.
    Returns (the highest concurrency that met the target, the lowest above it that missed), None
    where there is none: throughput saturated first, or nothing met it."""
    first = max((c for c in ladder if c <= start), default=ladder[0])
    met = None
    for concurrency in [c for c in ladder if c >= first]:
        best = max((lv["img_s"] for lv in levels), default=0.0)
        if not run(concurrency):
            if met is None:
                break  # even the first missed: down the ladder
            return met, concurrency
        if best and levels[-1]["img_s"] < best * SATURATED_GAIN:
            return concurrency, None
        met = concurrency
    else:
        return met, None
    missed = first
    for concurrency in sorted((c for c in ladder if c < first), reverse=True):
        if run(concurrency):
            return concurrency, missed
        missed = concurrency
    return None, None


def midway(low: int, high: int) -> int | None:
    """The concurrency halfway between two, on a log scale, if there is one."""
    mid = round(math.sqrt(low * high))
    return mid if low < mid < high else None


def refinements(best: Candidate) -> list[tuple[str, list[Change]]]:
    """The refining pass: the neighbours of the best batch size and delay."""
    b, d = best.max_batch_size, best.max_queue_delay_us
    batches = sorted({max(1, b // 2), min(256, b * 2)} - {b})
    delays = sorted({d // 2, d * 2 if d else 250} - {d})
    return [
        ("max batch size, refined", [{"max_batch_size": v} for v in batches]),
        ("max queue delay, refined", [{"max_queue_delay_us": v} for v in delays]),
    ]


def start_for(m: Measurement, p99_ms: float) -> int:
    """Where a ladder starts for a candidate like `m`: half the callers of its best level, since
    the levels far below it cannot score higher and cost as much time as any other."""
    best = m.best(p99_ms)
    return max(1, best["concurrency"] // 2) if best and best["concurrency"] else 1


@dataclass
class SearchResult:
    best: Measurement  # its search reading
    default: Measurement
    measured: list[Measurement] = field(default_factory=list)  # in search order, cached ones too
    confirmed: list[Measurement] = field(default_factory=list)  # the finalists' and defaults' second readings
    cached: int = 0
    skipped: list[str] = field(default_factory=list)  # candidate keys the budget left out
    steps: list[dict[str, str]] = field(default_factory=list)  # per setting: what won

    def readings(self, candidate: Candidate) -> list[Measurement]:
        return [m for m in (*self.measured, *self.confirmed) if m.candidate == candidate]

    def claim(self, candidate: Candidate) -> list[Measurement]:
        """The readings a figure is claimed on: the second ones where the budget allowed them. The
        search reading of the winner was chosen for being high, so it would promise too much; and
        on a machine whose speed drifts over a tune (this one's moves by 15-30%) the check reads
        closer to the second reading than to the first."""
        again = [m for m in self.confirmed if m.candidate == candidate]
        return again or self.readings(candidate)


class Search:
    """Coordinate descent over `axes`, then `refinements`, then the finalists confirmed, within
    the budget."""

    def __init__(self, bench: Bench, cache: Cache, deadline: float, reserve_runs: int) -> None:
        self.bench = bench
        self.p99_ms = bench.settings.p99_ms
        self.cache = cache
        self.deadline = deadline  # time.monotonic() by which the final check too must be done
        self.reserve_runs = reserve_runs  # measurements the final check needs
        self.seconds: list[float] = []  # of the measurements made here
        self.from_cache = 0

    def _fits(self, reserve: int) -> bool:
        """Whether one more measurement and `reserve` more fit, at the mean cost so far (this
        run's, else the cached ones')."""
        past = self.seconds or [m.seconds for m in self.cache.found.values()] or [0.0]
        return time.monotonic() + (1 + reserve) * statistics.mean(past) <= self.deadline

    def measure(
        self, candidate: Candidate, start: int, phase: str = "search", always: bool = False
    ) -> Measurement | None:
        """From the cache, else measured if the budget allows (or `always`), else None. The search
        keeps room for the finalists' confirmation as well as for the final check."""
        m = self.cache.found.get((phase, candidate.key))
        if m is not None:
            self.from_cache += phase == "search"
        else:
            reserve = self.reserve_runs + (FINALISTS + 1 if phase == "search" else 0)
            if not (always or self._fits(reserve)):
                return None
            m = self.bench.closed_loop(candidate, phase, start=start)
            self.seconds.append(m.seconds)
            self.cache.add(m)
        say(m, self.p99_ms)
        return m

    def run(self, precisions: Sequence[str]) -> SearchResult:
        default = self.bench.default
        first = self.measure(default, start=1, always=True)  # the baseline, whatever the budget
        assert first is not None
        result = SearchResult(best=first, default=first, measured=[first])
        coarse = axes(usable_cores(), self.bench.settings.device, precisions)
        with tqdm(total=sum(len(v) for _, v in coarse) + 4, unit="candidate", disable=None) as bar:
            for name, changes in coarse:
                self._axis(result, name, changes, bar)
            for name, changes in refinements(result.best.candidate):
                self._axis(result, name, changes, bar)
        self._confirm(result)
        result.cached = self.from_cache
        return result

    def figure(self, result: SearchResult, candidate: Candidate) -> Figure:
        return Figure.of(result.readings(candidate), self.p99_ms)

    def _axis(self, result: SearchResult, name: str, changes: list[Change], bar: tqdm) -> None:
        """Each value of one setting on the best so far; the best of them stays. The delay is not
        searched at a batch size of 1: such a batch is full with its first request and never waits,
        so its candidates would differ by noise alone (and one would win by it)."""
        incumbent = result.best
        if incumbent.candidate.max_batch_size == 1 and all("max_queue_delay_us" in c for c in changes):
            bar.update(len(changes))
            verdict = "not searched (a batch of 1 never waits):"
            result.steps.append({"setting": name, "verdict": verdict, "best": incumbent.candidate.key})
            return
        for change in changes:
            bar.update()
            candidate = dataclasses.replace(incumbent.candidate, **change)  # type: ignore[arg-type]
            if any(m.candidate == candidate for m in result.measured):
                continue
            m = self.measure(candidate, start_for(result.best, self.p99_ms))
            if m is None:
                result.skipped.append(candidate.key)
                continue
            result.measured.append(m)
            if better(Figure.of([m], self.p99_ms), Figure.of([result.best], self.p99_ms)):
                result.best = m
        verdict = "kept" if result.best is incumbent else "chose"
        result.steps.append({"setting": name, "verdict": verdict, "best": result.best.candidate.key})

    def _confirm(self, result: SearchResult) -> None:
        """The winner's curse: the highest of many noisy readings is likely one that read high. The
        FINALISTS best are measured once more and the choice made on the means of their readings,
        so the figure the written file is held to is not its luckiest. The defaults are measured
        again too, so that the two figures the speed-up is claimed on are taken alike."""
        ranked = sorted(result.measured, key=lambda m: m.score(self.p99_ms), reverse=True)
        finalists = [m for m in ranked[:FINALISTS] if m.score(self.p99_ms) > 0]
        defaults_in = any(m.candidate == result.default.candidate for m in finalists)
        for m in finalists if defaults_in else [*finalists, result.default]:
            again = self.measure(m.candidate, start_for(m, self.p99_ms), phase="confirm")
            if again is not None:
                result.confirmed.append(again)
        champion = result.best
        for m in finalists:
            if better(self.figure(result, m.candidate), self.figure(result, champion.candidate)):
                champion = m
        verdict = "kept" if champion is result.best else "chose"
        result.steps.append(
            {"setting": "finalists, measured again", "verdict": verdict, "best": champion.candidate.key}
        )
        result.best = champion


def say(m: Measurement, p99_ms: float) -> None:
    """One line per measurement, above the progress bar."""
    best = m.best(p99_ms)
    if m.error:
        text = f"did not start: {m.error.splitlines()[0]}"
    elif best:
        cpu = f", {best['cpu_ms_per_img']:.2f} CPU ms/img" if best["cpu_ms_per_img"] else ""
        text = (
            f"{m.score(p99_ms):.1f} img/s at the target; best level {best['img_s']:.1f} img/s at "
            f"{best['concurrency']} callers, p99 {best['p99_ms']:.0f} ms{cpu}"
        )
    else:
        text = f"p99 over {p99_ms:g} ms even at 1 caller"
    tqdm.write(f"{m.phase} {m.candidate.key}: {text}", sys.stderr)


# --- precision ---------------------------------------------------------------------------------


def reduced_files(
    model: Path, folder: Path, val: Path, calib: Path | None, max_drop: float | None
) -> tuple[dict[str, Path], list[dict[str, Any]]]:
    """`model` and its fp16 and int8 versions that pass the accuracy gate on `val`, made once per
    cache folder; the gates' verdicts either way."""
    from training.export import AccuracyGateError, ExportError, reduce_export
    from training.precision import DEFAULT_MAX_DROP, Calibration, Reduction

    limit = DEFAULT_MAX_DROP if max_drop is None else max_drop

    files, gates = {"fp32": model}, []
    record = folder / "gates.json"
    known = {g["precision"]: g for g in json.loads(record.read_text())} if record.exists() else {}
    for precision in ("fp16", "int8"):
        out = folder / f"{model.stem}.{precision}.onnx"
        if precision not in known or (known[precision]["passed"] and not out.exists()):
            calibration = Calibration(calib or val) if precision == "int8" else None
            try:
                gate = reduce_export(model, out, Reduction(precision, val, limit, calibration), force=True)
                known[precision] = {"precision": precision, "passed": True, "summary": gate.summary()}
            except AccuracyGateError as exc:
                known[precision] = {"precision": precision, "passed": False, "summary": str(exc)}
            except (ExportError, ValueError) as exc:
                raise CommandError(f"--val: no {precision} version of {model}: {exc}") from None
            atomic_write_text(record, json.dumps(list(known.values()), indent=2) + "\n")
        gates.append(known[precision])
        if known[precision]["passed"]:
            files[precision] = out
        tqdm.write(f"{precision}: {known[precision]['summary']}", sys.stderr)
    return files, gates


# --- the result --------------------------------------------------------------------------------


def write_config(out: Path, model: Path, candidate: Candidate, header: Sequence[str]) -> None:
    """The YAML `hrnet serve --config` reads: the model file and every tuned setting, stated."""
    data = {"model": str(model), **candidate.settings()}
    text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(data, sort_keys=False)
    atomic_write_text(out, text)


def served_model(out: Path, files: dict[str, Path], precision: str) -> Path:
    """The file the configuration serves (a reduced one copied out of the cache, beside it), named
    relative to the working directory when inside it, as `hrnet serve` resolves it, else in full."""
    source = files[precision]
    if precision != "fp32":
        target = out.parent / source.name
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        source = target
    path = source.resolve()
    return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path


def verify(bench: Bench, found: SearchResult, config: Path, deadline: float) -> dict[str, Any]:
    """The defaults and the written file, alternated, each climbing the ladder as in the search;
    then the certifying open loop on both. A round after the first runs only if it and the open
    loops still fit before `deadline`, at what the last round took: the search reserved time for
    every round, but a machine that sped up climbs more levels in each."""
    s = bench.settings
    p99 = s.p99_ms
    chosen = found.best.candidate
    open_loops_s = (len(s.certify_shares) + 1) * (
        max(s.warmup_s, 1.0) + 2 * s.duration_s
    ) + 2 * SERVER_START_S
    default_runs, chosen_runs = [], []
    for index in range(s.rounds):
        if (
            index
            and time.monotonic() + default_runs[-1].seconds + chosen_runs[-1].seconds + open_loops_s
            > deadline
        ):
            tqdm.write(f"check: {index} of {s.rounds} rounds fit the budget", sys.stderr)
            break
        default_runs.append(bench.closed_loop(bench.default, "verify", start=start_for(found.default, p99)))
        say(default_runs[-1], p99)
        chosen_runs.append(bench.closed_loop(chosen, "verify", config, start_for(found.best, p99)))
        say(chosen_runs[-1], p99)
    default_img_s = statistics.median(m.score(p99) for m in default_runs)
    chosen_img_s = statistics.median(m.score(p99) for m in chosen_runs)
    certify: dict[str, Any] = {}
    if chosen_img_s > 0:
        rates = [share * chosen_img_s for share in bench.settings.certify_shares]
        chosen_levels = bench.open_loop(chosen, rates, config)
        held = best_level(chosen_levels, p99)
        rate = rates[len(chosen_levels) - 1]
        certify = {
            "rates_img_s": rates[: len(chosen_levels)],
            "certified_img_s": rate if held else None,
            "chosen": chosen_levels,
            "default": bench.open_loop(bench.default, [rate])[0],
        }
    return {
        "default_runs": [m.as_dict() for m in default_runs],
        "chosen_runs": [m.as_dict() for m in chosen_runs],
        "default_img_s": default_img_s,
        "chosen_img_s": chosen_img_s,
        "speedup": chosen_img_s / default_img_s if default_img_s else None,
        "certify": certify,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `hrnet bench tune`, for its own parser and for `hrnet bench gpu run --tune-p99-ms`."""
    parser.add_argument("--model", type=Path, required=True, help="the ONNX or MINDIR file to serve")
    parser.add_argument(
        "--p99-ms", type=float, required=True, help="latency target: p99 of one-image requests, ms"
    )
    parser.add_argument("--out", type=Path, required=True, help="the configuration to write (YAML)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=600.0,
        help="seconds for the whole tune, checks included (default 600)",
    )
    parser.add_argument(
        "--images", type=Path, help="send encoded images from this folder (default: FP32 tensors)"
    )
    parser.add_argument(
        "--val",
        type=Path,
        metavar="DIR",
        help="ImageFolder val set: also try fp16 and int8 files that pass "
        "the accuracy gate on it (an fp32 ONNX export of ours)",
    )
    parser.add_argument("--calib", type=Path, metavar="DIR", help="int8 calibration images (default: --val)")
    parser.add_argument(
        "--max-drop",
        type=float,
        metavar="POINTS",
        help="the accuracy gate's top-1 limit, points (default: hrnet export's)",
    )
    parser.add_argument(
        "--concurrency", type=ints, help="closed-loop callers tried in order (default 1,2,4,...,128)"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=TuneSettings.warmup_s,
        help=f"seconds before each level (default {TuneSettings.warmup_s:g})",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=TuneSettings.duration_s,
        help=f"seconds measured per level (default {TuneSettings.duration_s:g})",
    )
    parser.add_argument("--workers", type=int, default=1, help="load generator processes (default 1)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    parser.add_argument(
        "--certify-shares",
        type=floats,
        default=TuneSettings.certify_shares,
        help="open-loop rates tried, as shares of the chosen throughput, until the p99 holds (default "
        f"{','.join(f'{share:g}' for share in TuneSettings.certify_shares)})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=TuneSettings.rounds,
        help=f"alternated re-measurements of the defaults and the result (default {TuneSettings.rounds})",
    )
    parser.add_argument(
        "--cache", type=Path, help="measurements kept here, to resume (default runs/tune/<model>-<hash>)"
    )


def run(args: argparse.Namespace) -> Report:
    began = time.monotonic()
    machine = this_machine()
    if not args.model.is_file():
        raise CommandError(f"model file {args.model} does not exist")
    if args.budget_s <= 0:
        raise CommandError(f"--budget-s must be > 0, got {args.budget_s}")
    settings = TuneSettings(
        p99_ms=args.p99_ms,
        ladder=args.concurrency or DEFAULT_LADDER,
        warmup_s=args.warmup,
        duration_s=args.duration,
        device=args.device,
        certify_shares=args.certify_shares,
        rounds=args.rounds,
    )
    spec = WorkloadSpec(images=args.images, timeout_s=args.timeout)
    folder = args.cache or cache_folder(Path("runs/tune"), args.model, spec, settings, machine)
    cache = Cache(folder)
    files: dict[str, Path] = {"fp32": args.model}
    gates: list[dict[str, Any]] = []
    if args.val:
        files, gates = reduced_files(args.model, folder, args.val, args.calib, args.max_drop)
    default = default_candidate(usable_cores())
    with LoadGenerator(args.workers) as generator, gpu_probe() as gpus:
        bench = Bench(generator, files, spec, settings, default, gpus)
        search = Search(bench, cache, began + args.budget_s, reserve_runs=2 * settings.rounds + 2)
        found = search.run(list(files))
        chosen = found.best.candidate
        p99 = settings.p99_ms
        model = served_model(args.out, files, chosen.precision)
        bench.files[chosen.precision] = model  # the check serves the file the configuration names
        tuned = Figure.of(found.claim(chosen), p99).img_s
        defaults = Figure.of(found.claim(default), p99).img_s
        header = [
            f"hrnet bench tune, {time.strftime('%Y-%m-%d %H:%M')}, {machine.describe()}",
            f"p99 target {p99:g} ms: {tuned:.1f} img/s tuned, the defaults {defaults:.1f}; "
            f"candidate {chosen.key}",
        ]
        write_config(args.out, model, chosen, header)
        checked = verify(bench, found, args.out, began + args.budget_s)
    checked["reproduced"] = checked["chosen_img_s"] / tuned if tuned else None
    # the same ratio for the defaults: a machine that slowed or sped up since the search moves both
    checked["defaults_reproduced"] = checked["default_img_s"] / defaults if defaults else None
    tune = {
        "p99_ms": p99,
        "budget_s": args.budget_s,
        "seconds": time.monotonic() - began,
        "cache": str(folder),
        "cached": found.cached,
        "skipped": found.skipped,
        "steps": found.steps,
        "gates": gates,
        "default": default.key,
        "chosen": chosen.key,
        "chosen_settings": chosen.settings(),
        "tuned_img_s": tuned,
        "steal_limit": STEAL_LIMIT,
        "config": str(args.out),
        "served_model": str(model),
        "candidates": [m.as_dict() for m in found.measured],
        "confirmed": [m.as_dict() for m in found.confirmed],
        "verify": checked,
    }
    workload = {**spec.describe(bench.model), "workers": args.workers} if bench.model else {}
    return Report("tune", machine, command_line(), args.note, workload=workload, extra={"tune": tune})
