"""`hrnet bench`: every mode against real servers on 127.0.0.1, reports written and read back.

Timings are not asserted (they belong in the reports, not in tests); what is asserted is that
the figures exist, add up and agree: requests counted, errors named by status, the server's own
statistics read, percentiles exact on known samples, accuracy equal to `hrnet eval` image by image.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.latency import LatencySummary, percentile
from benchmarks.loadgen import Level, LoadGenerator, split
from benchmarks.protocol import CLASSIFIER, KSERVE, fetch_model_info
from benchmarks.report import LEVEL_COLUMNS, level_table
from benchmarks.sweep import WorkloadSpec
from benchmarks.targets import gpu_probe

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK = ["--warmup", "0.5", "--duration", "1.5"]


def bench(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "hrnet", "bench", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_percentiles_are_nearest_rank_on_known_samples() -> None:
    samples = np.arange(1, 1001, dtype=np.float64)  # 1..1000 ms
    assert [percentile(samples, q) for q in (50, 90, 99, 99.9, 100)] == [500, 900, 990, 999, 1000]
    assert percentile(samples, 0) == 1
    assert [percentile(np.array([7.0, 9.0]), q) for q in (50, 50.1, 99)] == [7, 9, 9]
    shuffled = np.random.default_rng(0).permutation(samples) / 1000  # seconds, in any order
    summary = LatencySummary.of(shuffled)
    assert summary is not None
    assert (summary.p50_ms, summary.p90_ms, summary.p99_ms, summary.p999_ms, summary.max_ms) == pytest.approx(
        (500, 900, 990, 999, 1000)
    )
    assert summary.mean_ms == pytest.approx(500.5)
    assert dict(summary.cdf_ms)[99.5] == pytest.approx(995)
    assert LatencySummary.of([]) is None
    with pytest.raises(ValueError):
        percentile([], 50)


def test_shares_and_levels_are_checked() -> None:
    assert split(10, 4) == [3, 3, 2, 2]
    assert split(1, 3) == [1, 0, 0]
    with pytest.raises(ValueError, match="either closed loop"):
        Level(concurrency=4, rate=10)
    assert Level(concurrency=1).label == "1 caller"
    assert Level(rate=2.5).label == "2.5 req/s"


@pytest.mark.slow  # ~18 s: a server, a ceiling and a load sweep
def test_load_sweep_writes_reports_that_parse_back(model_repo, tmp_path: Path) -> None:
    """A short closed-loop sweep against `hrnet serve` started by the command, two worker processes."""
    out, folder = tmp_path / "load.json", tmp_path / "report"
    result = bench(
        "load", "--model", model_repo.onnx, "--concurrency", "1,4", *QUICK, "--workers", "2",
        "--batch-sizes", "1,4", "--ceiling-seconds", "0.3", "--json", out, "--report", folder,
        "--note", "test run", "--paired", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_json(out)
    assert report == read_json(folder / "load.json")
    assert "cores" in report["machine"]["description"] and report["note"] == "test run"
    (ceiling,) = report["ceilings"]
    assert [b["batch"] for b in ceiling["batches"]] == [1, 4] and ceiling["best_img_s"] > 0
    (target,) = report["targets"]
    assert target["label"] == "hrnet serve" and target["model"] == "hrnet"
    assert [lv["concurrency"] for lv in target["levels"]] == [1, 4]
    for level in target["levels"]:
        assert level["errors"] == {} and level["ok"] > 0
        assert level["img_s"] == pytest.approx(level["ok"] / level["window_s"])
        assert level["p50_ms"] <= level["p90_ms"] <= level["p99_ms"] <= level["p999_ms"] <= level["max_ms"]
        assert level["ratio_to_ceiling"] == pytest.approx(level["img_s"] / ceiling["best_img_s"])
        assert level["mean_batch"] >= 1 and level["compute_ms"] > 0 and level["queue_ms"] >= 0
        sizes = {int(size): count for size, count in level["batch_sizes"].items()}
        mean = sum(size * count for size, count in sizes.items()) / sum(sizes.values())
        assert mean == pytest.approx(level["mean_batch"])
        assert level["server_cpu"] > 0 and level["loadgen_cpu"] > 0
    assert set(target["levels"][0]["batch_sizes"]) == {"1"}  # one caller never batches
    assert target["ratio_to_ceiling"] == max(lv["ratio_to_ceiling"] for lv in target["levels"])
    paired = report["paired"]  # ceiling and server alternated at the saturation level
    assert (paired["level"], paired["batch"]) == (target["saturation_level"], ceiling["best_batch"])
    assert [p["server_first"] for p in paired["pairs"]] == [False, True] and paired["seconds"] == 1.5
    for pair in paired["pairs"]:
        assert pair["ratio_to_ceiling"] == pytest.approx(pair["server_img_s"] / pair["ceiling_img_s"])
    ratios = sorted(p["ratio_to_ceiling"] for p in paired["pairs"])
    assert paired["ratio_to_ceiling"] == pytest.approx(sum(ratios) / 2)
    assert (paired["ratio_min"], paired["ratio_max"]) == (ratios[0], ratios[-1])
    markdown = (folder / "load.md").read_text(encoding="utf-8")
    assert "## hrnet serve" in markdown and "| 4 callers |" in markdown and "saturation:" in markdown
    assert "paired with the ceiling: 2 alternated pairs" in markdown and "median of the pairs" in markdown
    for name in ("batches", "throughput", "p99", "latency_cdf"):
        assert (folder / f"load_{name}.png").read_bytes().startswith(PNG_MAGIC)
    assert "saturation:" in result.stdout and "wrote" in result.stdout


def test_load_against_a_running_server_by_url(grpc_server, model_repo, digit_images, tmp_path: Path) -> None:
    """Any running KServe server: named as it names itself; with its file given, the ceiling too."""
    out = tmp_path / "url.json"
    result = bench(
        "load", "--url", grpc_server.address, "--model-name", "hrnet", "--model", model_repo.onnx,
        "--concurrency", "2", "--warmup", "0.2", "--requests", "10", "--api", "classifier",
        "--images", digit_images[0].path.parent, "--batch-sizes", "2", "--ceiling-seconds", "0.2",
        "--json", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_json(out)
    (target,) = report["targets"]
    assert target["label"].startswith("hrnet ") and target["settings"]["url"] == grpc_server.address
    (level,) = target["levels"]
    assert (level["ok"], level["errors"], level["server_cpu"]) == (10, {}, None)  # not ours to measure
    assert level["ratio_to_ceiling"] == pytest.approx(level["img_s"] / report["ceilings"][0]["best_img_s"])
    assert "encoded images" in report["workload"]["input"] and report["workload"]["api"] == "classifier"


@pytest.mark.slow  # 3-5 s: an open-loop load of the shared server
def test_open_loop_streaming_and_errors_by_status(grpc_server, digit_images) -> None:
    """Poisson arrivals over one ClassifyStream with images; a wrong model name fails as NOT_FOUND."""
    model = fetch_model_info(grpc_server.address, "hrnet")
    folder = digit_images[0].path.parent
    images = WorkloadSpec(CLASSIFIER, folder, images_per_request=2, streaming=True).build(model)
    tensors = WorkloadSpec(KSERVE).build(model)
    missing = WorkloadSpec(KSERVE).build(dataclasses.replace(model, name="absent"))
    with LoadGenerator(workers=2) as generator:
        generator.add_target("images", grpc_server.address, images)
        generator.add_target("tensors", grpc_server.address, tensors)
        generator.add_target("missing", grpc_server.address, missing)
        measured = generator.run("images", Level(rate=40, warmup_s=0.2, requests=20))
        assert (measured.ok, measured.errors) == (20, {})
        assert measured.img_s == pytest.approx(2 * measured.req_s)
        assert measured.latency is not None and measured.latency.count == 20
        measured = generator.run("tensors", Level(concurrency=3, warmup_s=0.2, requests=12))
        assert (measured.ok, measured.errors) == (12, {})
        measured = generator.run("missing", Level(concurrency=2, warmup_s=0, requests=6))
        assert (measured.ok, measured.errors, measured.latency) == (0, {"NOT_FOUND": 6}, None)


def _connections_to(pid: int, port: int) -> int:
    """Established TCP connections of process `pid` to `port` (its socket inodes in /proc/net)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    rows = [
        line.split()
        for table in ("tcp", "tcp6")
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]
    ]
    return sum(1 for r in rows if r[2].endswith(f":{port:04X}") and r[3] == "01" and r[9] in inodes)


def test_a_workload_opens_its_connections_each_a_tcp_connection_of_its_own(grpc_server) -> None:
    """Several connections per load process: the kernel spreads connections, not calls, over the
    front ends of `hrnet serve --workers`. gRPC would otherwise share one between channels."""
    model = fetch_model_info(grpc_server.address, "hrnet")
    workload = dataclasses.replace(WorkloadSpec(KSERVE).build(model), connections=3)
    port = int(grpc_server.address.rsplit(":", 1)[1])
    with LoadGenerator(workers=1) as generator:
        (worker,) = generator.pids
        assert _connections_to(worker, port) == 0
        generator.add_target("tensors", grpc_server.address, workload)
        assert _connections_to(worker, port) == 3
        measured = generator.run("tensors", Level(concurrency=6, warmup_s=0, requests=12))
        assert (measured.ok, measured.errors) == (12, {})
        assert _connections_to(worker, port) == 3  # the callers took turns on the same three


def test_ceiling_reports_several_files_side_by_side(model_repo, tmp_path: Path) -> None:
    out = tmp_path / "ceiling.json"
    result = bench(
        "ceiling", "--model", model_repo.onnx, "--model", model_repo.plain, "--batch-sizes", "1,3",
        "--seconds", "0.2", "--json", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = read_json(out)["ceilings"]
    assert (first["model"], second["model"]) == (str(model_repo.onnx), str(model_repo.plain))
    for ceiling in (first, second):
        assert [b["batch"] for b in ceiling["batches"]] == [1, 3]
        assert all(b["runs"] >= 3 and b["min_ms"] <= b["p50_ms"] <= b["max_ms"] for b in ceiling["batches"])
        assert ceiling["best_img_s"] == max(b["img_s"] for b in ceiling["batches"])
    header = next(line for line in result.stdout.splitlines() if line.lstrip().startswith("batch"))
    assert header.count("img/s") == 2


@pytest.mark.slow  # ~11 s: two servers under load
def test_batching_mode_compares_off_and_on_on_the_shared_generator(model_repo, tmp_path: Path) -> None:
    out = tmp_path / "batching.json"
    result = bench(
        "batching", "--model", model_repo.onnx, "--concurrency", "4", "--repeats", "1", *QUICK,
        "--no-ceiling", "--json", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    batching = read_json(out)["batching"]
    off, on = batching["settings"]
    assert off["label"] == "no batching" and off["mean_batch"] == pytest.approx(1.0)
    assert on["label"] == "batching 16 / 2000 us" and on["mean_batch"] >= 1.0
    assert batching["gain"] == pytest.approx(on["img_s"] / off["img_s"])
    assert "speed-up from batching" in result.stdout


@pytest.mark.slow  # ~20 s, and the digits_model fixture (~9 s)
def test_accuracy_through_the_server_equals_hrnet_eval(digits_model, tmp_path: Path) -> None:
    out, folder = tmp_path / "accuracy.json", tmp_path / "report"
    result = bench(
        "accuracy", "--model", digits_model.onnx, "--data", digits_model.val, "--ckpt", digits_model.ckpt,
        "--json", out, "--report", folder, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = read_json(out)["accuracy"]
    assert accuracy["images"] == accuracy["eval"]["images"] == 359 and accuracy["failed"] == 0
    assert (accuracy["top1"], accuracy["top5"]) == (accuracy["eval"]["top1"], accuracy["eval"]["top5"])
    assert accuracy["agreement"] == 1.0 and accuracy["differ"] == []
    assert "'Top_1_Acc':" in result.stdout and "agreement with hrnet eval: 1.0000" in result.stdout
    assert "Accuracy" in (folder / "accuracy.md").read_text(encoding="utf-8")


@pytest.mark.slow  # the digits_model fixture: ~9 s
def test_accuracy_lists_the_images_that_differ(digits_model, tmp_path: Path) -> None:
    """The comparison is by image name: a prediction file naming other classes shows up image by image."""
    from benchmarks.accuracy import compare, image_folder

    _, images = image_folder(digits_model.val)
    server = [[image.label] for image in images]
    reference = {image.name: [image.label] for image in images}
    reference[images[5].name] = [(images[5].label + 1) % 10]
    agreement, differ = compare(images, server, reference)
    assert agreement == pytest.approx(1 - 1 / len(images))
    assert differ == [{"image": images[5].name, "label": images[5].label, "server": images[5].label,
                       "eval": (images[5].label + 1) % 10}]  # fmt: skip


@pytest.mark.slow  # ~50 s: MLServer and hrnet serve measured side by side
def test_peers_runs_mlserver_beside_ours(model_repo, tmp_path: Path) -> None:
    from benchmarks.peers.mlserver import PeerUnavailable, environment

    peers_dir = REPO / "runs" / "peers"  # the virtual environment is installed once and reused
    try:
        environment(peers_dir)
    except PeerUnavailable as exc:
        pytest.skip(f"MLServer cannot be installed here: {exc}")
    out = tmp_path / "peers.json"
    result = bench(
        "peers", "--model", model_repo.onnx, "--concurrency", "2", *QUICK, "--no-ceiling",
        "--peers-dir", peers_dir, "--json", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_json(out)
    ours, mlserver = report["targets"]
    assert (ours["label"], mlserver["label"]) == ("hrnet serve", "MLServer 1.7.1")
    for target in (ours, mlserver):
        (level,) = target["levels"]
        assert level["ok"] > 0 and level["errors"] == {}
    assert mlserver["levels"][0]["mean_batch"] is None  # MLServer has no ModelStatistics
    (comparison,) = report["peers"].values()
    assert comparison["levels"][0]["speedup"] == pytest.approx(
        ours["levels"][0]["img_s"] / mlserver["levels"][0]["img_s"]
    )


def test_bad_invocations_fail_in_one_line() -> None:
    result = bench("load", "--concurrency", "1")
    assert (
        result.returncode == 2 and "give one of --url" in result.stderr and "Traceback" not in result.stderr
    )
    result = bench("load", "--model", "absent.onnx")
    assert result.returncode == 2 and "absent.onnx does not exist" in result.stderr
    result = bench("load", "--url", "127.0.0.1:1", "--concurrency", "0")
    assert result.returncode == 2 and "expected integers >= 1" in result.stderr


def test_each_level_summarizes_the_gpu_where_nvml_finds_one(stand_in_nvml) -> None:

    with gpu_probe() as probe:
        assert probe is not None
        probe.start()
        (device,) = probe.stop()["gpu"]
    assert device == {
        "gpu": 0,
        "utilization": pytest.approx(0.37),
        "memory_used_bytes": 3 << 30,
        "power_watts": pytest.approx(215.5),
        "temperature_celsius": 54,
    }
    level = {"concurrency": 4, "rate": 0.0, "errors": {}, "gpu": [device]}
    level |= {key: None for _, key, _ in LEVEL_COLUMNS}
    header, (row,) = level_table({"levels": [level]})
    assert header[-1] == "GPU util, memory, power" and row[-1] == "0: 37% 3.0 GiB 216 W"


def test_no_nvml_no_gpu_probe_and_no_gpu_column(monkeypatch) -> None:

    monkeypatch.setitem(sys.modules, "pynvml", None)
    with gpu_probe() as probe:
        assert probe is None
    level = {"concurrency": 4, "rate": 0.0, "errors": {}, "gpu": []}
    level |= {key: None for _, key, _ in LEVEL_COLUMNS}
    header, _ = level_table({"levels": [level]})
    assert not any("GPU" in column for column in header)
