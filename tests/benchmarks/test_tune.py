"""`hrnet bench tune`: the search's rules, the file it writes as the server reads it, and one real
tune of the digits model through `hrnet serve` on 127.0.0.1, resumed from its cache.

Which candidate wins is the machine's business and is not asserted; what is asserted is what the
tuner promises whatever the machine: the defaults measured first, every candidate in the report,
the written file loadable by the server and served in the check, the gates' verdicts, the budget
reported, and a second run reading every earlier measurement back instead of repeating it.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tqdm import tqdm

from benchmarks.loadgen import Level, Measured
from benchmarks.protocol import ModelInfo
from benchmarks.report import at_target, pareto_front
from benchmarks.targets import StealProbe, Target
from benchmarks.tune import (
    DEFAULT_LADDER,
    STEAL_RETRIES,
    Bench,
    Cache,
    Candidate,
    Figure,
    Measurement,
    Search,
    SearchResult,
    TuneSettings,
    better,
    climb,
    default_candidate,
    midway,
    refinements,
    write_config,
)
from serving.config import load_server_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _measured(img_s: float, cpu_ms: float | None, p99_ms: float = 50.0) -> Measurement:
    level = {"concurrency": 4, "img_s": img_s, "p99_ms": p99_ms, "errors": {}, "cpu_ms_per_img": cpu_ms}
    return Measurement(default_candidate(2), [level], 1.0, "search")


def _figure(img_s: float, cpu_ms: float | None, p99_ms: float = 50.0) -> Figure:
    return Figure.of([_measured(img_s, cpu_ms, p99_ms)], 100)


def test_more_throughput_wins_and_ties_go_to_less_cpu() -> None:
    base = _figure(100.0, 2.0)
    assert better(_figure(110.0, 3.0), base)  # beyond the tie band: throughput decides
    assert not better(_figure(103.0, 3.0), base)  # a tie costing more CPU keeps the incumbent
    assert better(_figure(98.0, 1.5), base)  # a tie for less CPU wins
    assert not better(_figure(500.0, 0.1, p99_ms=150.0), base)  # over the target scores 0
    assert not better(_figure(0.0, 0.1), _figure(0.0, 1.0))  # nothing met the target: no change
    assert Figure.of([_measured(100.0, 2.0), _measured(80.0, None)], 100) == Figure(90.0, float("inf"))


class Server:
    """A server whose p99 is proportional to the callers and whose throughput rises until
    `saturates` callers: what `climb` sees of a real one, at no cost."""

    def __init__(self, ms_per_caller: float, saturates: int = 1000) -> None:
        self.ms_per_caller, self.saturates = ms_per_caller, saturates
        self.levels: list[dict[str, Any]] = []

    def run(self, concurrency: int) -> bool:
        img_s = 100.0 * min(concurrency, self.saturates)
        p99 = self.ms_per_caller * concurrency
        self.levels.append({"concurrency": concurrency, "img_s": img_s, "p99_ms": p99, "errors": {}})
        return p99 <= 25

    def climb(self, start: int = 1) -> tuple[int | None, int | None]:
        return climb(DEFAULT_LADDER, self.run, self.levels, start)

    def tried(self) -> list[int]:
        return [lv["concurrency"] for lv in self.levels]


def test_the_throughput_at_the_target_is_read_between_the_levels_around_it() -> None:
    """A p99 a little over or under the target moves the score a little, not by a whole level."""

    def level(callers: int, img_s: float, p99_ms: float, errors: dict | None = None) -> dict[str, Any]:
        return {"concurrency": callers, "img_s": img_s, "p99_ms": p99_ms, "errors": errors or {}}

    ladder = [level(4, 500.0, 10.0), level(8, 800.0, 20.0), level(16, 1000.0, 40.0)]
    assert at_target(ladder, 25.0) == 850.0  # a quarter of the way from 20 to 40 ms
    assert at_target(ladder, 20.0) == 800.0 and at_target(ladder, 40.0) == 1000.0
    assert at_target(ladder, 26.0) - at_target(ladder, 24.0) == 20.0  # no jump at the target
    assert at_target([*ladder[:2], level(16, 700.0, 40.0)], 25.0) == 800.0  # saturated: no gain read in
    assert at_target([*ladder[:2], level(16, 1000.0, 40.0, {"UNAVAILABLE": 3})], 25.0) == 800.0
    assert at_target(ladder, 5.0) == 0.0  # nothing met it


def test_the_share_of_the_cpu_the_hypervisor_took_is_read_from_proc_stat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real file where the kernel has it; then a written one, since no test can make a
    hypervisor take this machine's CPU."""
    if StealProbe.available():
        probe = StealProbe()
        probe.start()
        sum(i * i for i in range(200_000))
        assert 0.0 <= probe.stop().get("steal", 0.0) <= 1.0
    stat = tmp_path / "stat"
    monkeypatch.setattr(StealProbe, "PATH", stat)
    stat.write_text("cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 1 2 3\n")
    probe = StealProbe()
    probe.start()
    stat.write_text("cpu  150 0 60 820 10 0 5 135 0 0\ncpu0 1 2 3\n")  # 180 jiffies, 100 stolen
    assert probe.stop() == {"steal": 100 / 180}
    stat.write_text("intr 1 2 3\n")
    assert not StealProbe.available()


class Neighbours:
    """A load generator stand-in whose windows the hypervisor took the given shares of."""

    def __init__(self, steals: list[float]) -> None:
        self.steals = steals

    def run(self, key: str, level: Level, probes: Any) -> Measured:
        steal = self.steals.pop(0)
        return Measured(level, 100, {}, 1.0, 1, None, 0.1, {"steal": steal})


def test_a_level_the_hypervisor_took_the_cpu_from_is_measured_again() -> None:
    target = Target("hrnet serve", "127.0.0.1:1", ModelInfo("m", "input", (3, 8, 8), "onnx", 16))
    level = Level(concurrency=4)

    def measured(steals: list[float]) -> dict[str, Any]:
        generator = Neighbours(steals)
        bench = Bench(generator, {}, None, TuneSettings(p99_ms=25.0), default_candidate(2), None)  # type: ignore[arg-type]
        result = bench._run("m", target, level)
        assert not generator.steals  # every reading given was taken, and no more
        return result

    assert measured([0.02])["remeasured"] == 0
    again = measured([0.6, 0.3, 0.05])
    assert again["remeasured"] == 2 and again["steal"] == 0.05 and again["img_s"] == 100.0
    kept = measured([0.6] * (STEAL_RETRIES + 1))
    assert kept["remeasured"] == STEAL_RETRIES and kept["steal"] == 0.6  # bounded: kept, and shown as such


def test_the_ladder_is_climbed_until_the_target_is_missed_or_throughput_stops() -> None:
    server = Server(ms_per_caller=2.0)  # 12 callers meet 25 ms, 16 do not
    assert server.climb() == (8, 16) and server.tried() == [1, 2, 4, 8, 16]
    assert midway(8, 16) == 11 and midway(1, 2) is None and midway(2, 4) == 3
    server = Server(ms_per_caller=2.0)
    assert server.climb(start=5) == (8, 16) and server.tried() == [4, 8, 16]  # from the rung below 5
    server = Server(ms_per_caller=10.0)  # 2 callers meet the target, 4 do not
    assert server.climb(start=8) == (2, 4) and server.tried() == [8, 4, 2]  # down when the start misses
    server = Server(ms_per_caller=0.1, saturates=4)
    assert server.climb() == (8, None) and server.tried() == [1, 2, 4, 8]  # 8 adds nothing: no midway
    server = Server(ms_per_caller=100.0)
    assert server.climb(start=2) == (None, None) and server.tried() == [2, 1]


def test_the_finalists_are_chosen_on_the_means_of_their_readings(tmp_path: Path) -> None:
    """The search's luckiest reading does not decide: three finalists, each read again (from the
    cache here, so nothing is served), and the one with the best mean wins."""
    p99 = 100.0
    settings = TuneSettings(p99_ms=p99)
    default = default_candidate(2)
    lucky, steady, third = (dataclasses.replace(default, max_batch_size=b) for b in (4, 8, 32))
    cache = Cache(tmp_path)
    for candidate, first, again in ((lucky, 200.0, 120.0), (steady, 170.0, 175.0), (third, 150.0, 140.0)):
        for phase, img_s in (("search", first), ("confirm", again)):
            level = {"concurrency": 4, "img_s": img_s, "p99_ms": 50.0, "errors": {}, "cpu_ms_per_img": 1.0}
            cache.add(Measurement(candidate, [level], 1.0, phase))
    bench = Bench(None, {}, None, settings, default, None)  # type: ignore[arg-type]  # never serves
    search = Search(bench, cache, deadline=0.0, reserve_runs=0)
    found = SearchResult(best=cache.found["search", lucky.key], default=cache.found["search", lucky.key])
    found.measured = [cache.found["search", c.key] for c in (lucky, steady, third)]
    search._confirm(found)
    assert [m.candidate for m in found.confirmed] == [lucky, steady, third]  # ranked by first reading
    assert found.best.candidate == steady  # 172.5 on average against the lucky one's 160
    assert found.steps[-1]["verdict"] == "chose"
    assert Figure.of(found.claim(steady), p99).img_s == 175.0  # claimed on the second reading only
    assert found.claim(default) == []  # the defaults' second reading did not fit the (zero) budget


def test_the_delay_is_not_searched_where_a_batch_of_one_never_waits(tmp_path: Path) -> None:
    settings = TuneSettings(p99_ms=100.0)
    default = default_candidate(2)
    bench = Bench(None, {}, None, settings, default, None)  # type: ignore[arg-type]  # never serves
    search = Search(bench, Cache(tmp_path), deadline=0.0, reserve_runs=0)  # no budget: all skipped
    delays: list[dict[str, Any]] = [{"max_queue_delay_us": d} for d in (0, 500)]
    for batch, tried in ((1, []), (4, [500, 0])):
        incumbent = Measurement(
            dataclasses.replace(default, max_batch_size=batch, max_queue_delay_us=2000), [], 1.0, "search"
        )
        found = SearchResult(best=incumbent, default=incumbent)
        with tqdm(disable=True) as bar:
            search._axis(found, "max queue delay", delays, bar)
        assert sorted(int(key.split()[-1][1:]) for key in found.skipped) == sorted(tried)
        assert found.steps[-1]["verdict"].startswith("not searched") == (batch == 1)


def test_the_refining_pass_tries_the_neighbours_of_the_best() -> None:
    best = Candidate("fp32", 1, 1, 2, max_batch_size=16, max_queue_delay_us=2000)
    (_, batches), (_, delays) = refinements(best)
    assert batches == [{"max_batch_size": 8}, {"max_batch_size": 32}]
    assert delays == [{"max_queue_delay_us": 1000}, {"max_queue_delay_us": 4000}]
    (_, batches), (_, delays) = refinements(
        Candidate("fp32", 1, 1, 2, max_batch_size=1, max_queue_delay_us=0)
    )
    assert batches == [{"max_batch_size": 2}] and delays == [{"max_queue_delay_us": 250}]


def test_the_pareto_front_keeps_only_points_nothing_beats() -> None:
    points = [(10.0, 100.0), (20.0, 90.0), (20.0, 150.0), (40.0, 140.0), (80.0, 300.0)]
    assert pareto_front(points) == [(10.0, 100.0), (20.0, 150.0), (80.0, 300.0)]


def test_the_written_file_is_what_the_server_reads(tmp_path: Path) -> None:
    candidate = Candidate(
        "fp32", workers=2, instances=3, threads=1, max_batch_size=512, max_queue_delay_us=750
    )
    out = tmp_path / "serving.yaml"
    write_config(out, tmp_path / "m.onnx", candidate, ["a header line"])
    assert out.read_text().startswith("# a header line\n")
    config = load_server_config(out, env={})
    assert (config.model, config.workers) == (str(tmp_path / "m.onnx"), 2)
    model = config.model_defaults
    assert (model.instances, model.threads_per_instance) == (3, 1)
    assert (model.batching.max_batch_size, model.batching.max_queue_delay_us) == (512, 750)
    assert model.batching.max_queue_size >= 512  # a batch that large must fit the queue


def test_the_default_candidate_is_what_the_server_runs_without_flags() -> None:
    config = load_server_config(None, env={}, flags={"model": "m.onnx"})
    for cores in (2, 16):
        default = default_candidate(cores)
        assert default.workers == config.front_ends(cores)
        assert default.threads == config.model_defaults.intra_op_threads(cores)
        assert default.max_batch_size == config.model_defaults.batching.max_batch_size
        assert default.max_queue_delay_us == config.model_defaults.batching.max_queue_delay_us


def _tune(*args: object) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "hrnet", "bench", "tune", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow  # ~90 s: fp16 and int8 files gated, a dozen servers, then a resumed run
def test_a_tune_writes_a_served_configuration_and_resumes(digits_model, tmp_path: Path) -> None:
    common = [
        "--model", digits_model.onnx, "--p99-ms", 5000, "--val", digits_model.val, "--max-drop", 100,
        "--concurrency", "1,2", "--warmup", 0.2, "--duration", 0.6, "--rounds", 1,
        "--cache", tmp_path / "cache", "--out", tmp_path / "serving.yaml",
    ]  # fmt: skip
    # 75 s: the gates, the defaults and the check take about 45 of them on 2 cores
    first = _tune(*common, "--budget-s", 75, "--json", tmp_path / "first.json", "--report", tmp_path / "rep")
    assert first.returncode == 0, first.stderr[-3000:]
    tune = json.loads((tmp_path / "first.json").read_text())["tune"]

    keys = [c["key"] for c in tune["candidates"]]
    assert keys[0] == tune["default"] and len(keys) == len(set(keys)) >= 2
    assert all(c["levels"] and not c["error"] for c in tune["candidates"])
    assert [g["precision"] for g in tune["gates"]] == ["fp16", "int8"]
    assert all(g["passed"] for g in tune["gates"])  # a limit of 100 points passes anything
    tried = {key.split()[0] for key in keys + tune["skipped"]}
    assert {"fp16", "int8"} <= tried  # measured, or left out by the budget

    config = load_server_config(tmp_path / "serving.yaml", env={})
    assert Path(config.model).is_file()
    assert (
        config.model_defaults.batching.max_batch_size
        == tune["chosen_settings"]["model_defaults"]["batching"]["max_batch_size"]
    )
    verify = tune["verify"]
    assert len(verify["default_runs"]) == len(verify["chosen_runs"]) == 1
    assert verify["chosen_img_s"] > 0 and verify["default_img_s"] > 0
    certify = verify["certify"]  # open loops from the highest rate down, stopping where the p99 held
    assert 1 <= len(certify["chosen"]) == len(certify["rates_img_s"]) <= 3
    assert certify["rates_img_s"] == sorted(certify["rates_img_s"], reverse=True)
    assert all(level["img_s"] > 0 for level in [*certify["chosen"], certify["default"]])
    assert certify["certified_img_s"] in (None, certify["rates_img_s"][-1])
    report = (tmp_path / "rep" / "tune.md").read_text()
    assert all(key in report for key in keys) and f"written: {tmp_path / 'serving.yaml'}" in report
    assert (tmp_path / "rep" / "tune_pareto.png").read_bytes().startswith(PNG_MAGIC)

    second = _tune(*common, "--budget-s", 1, "--json", tmp_path / "second.json")
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads((tmp_path / "second.json").read_text())["tune"]
    assert again["cached"] == len(again["candidates"]) >= len(keys)  # nothing measured twice
    assert [c["key"] for c in again["candidates"]][: len(keys)] == keys
