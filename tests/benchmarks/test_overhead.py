"""`hrnet bench overhead`: real servers on 127.0.0.1, real load processes, CPU read from /proc.

CPU figures themselves depend on the machine and are for people; what is asserted is what the
instrument must get right on any machine: every request answered, each process and thread found
and attributed, the arithmetic of the report, the files written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from benchmarks.loadgen import in_turn
from benchmarks.near_free import near_free_model
from benchmarks.overhead import ROLES, role
from hrnet.cli import main
from serving.engine.backends.instance import OS_NAME_INSTANCE, OS_NAME_POOL


def test_the_near_free_model_is_a_classifier_that_reads_three_numbers(tmp_path: Path) -> None:
    path = near_free_model(tmp_path / "m" / "model.onnx", 32, classes=4)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = np.zeros((3, 3, 32, 32), np.float32)
    batch[:, :, 0, 0] = 1.0  # the one pixel its stride reads
    (logits,) = session.run(None, {"input": batch})
    assert logits.shape == (3, 4) and np.abs(logits).sum() > 0
    batch[:, :, 1:, 1:] = 7.0  # every other pixel: ignored
    np.testing.assert_allclose(session.run(None, {"input": batch})[0], logits)


def test_threads_are_attributed_by_their_kernel_names() -> None:
    assert role(100, 100, "hrnet") == "event_loop"
    assert role(101, 100, OS_NAME_INSTANCE) == "instances"
    assert role(102, 100, OS_NAME_POOL) == "runtime_pool"
    assert role(103, 100, "grpc_global_tim") == "other_threads"


def test_repeats_take_the_settings_in_turns() -> None:
    """No setting is always measured first: the order reverses from one repeat to the next."""
    settings = [(1, "uvloop"), (1, "asyncio"), (2, "uvloop")]
    assert in_turn(settings, 0) == settings and in_turn(settings, 2) == settings
    assert in_turn(settings, 1) == [(2, "uvloop"), (1, "asyncio"), (1, "uvloop")]


@pytest.mark.slow
def test_one_and_two_processes_measured_split_and_reported(tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    args = ["bench", "overhead", "--serve-workers", "1,2", "--payloads", "fp32,jpeg", "--size", "32"]
    args += ["--concurrency", "4", "--warmup", "0.5", "--duration", "1", "--report", str(out)]
    args += ["--owner-alone", "1,4", "--owner-requests", "200", "--event-loops", "uvloop,asyncio"]
    assert main(args) == 0
    report = json.loads((out / "overhead.json").read_text())
    summary = report["overhead"]["summary"]
    assert sorted((r["payload"], r["serve_workers"], r["event_loop"]) for r in summary) == [
        (payload, workers, loop)
        for payload in ("fp32", "jpeg")
        for workers in (1, 2)
        for loop in ("asyncio", "uvloop")
    ]
    for row in summary:
        assert row["errors"] == {} and row["req_s"] > 0 and row["mean_batch"] >= 1
        assert set(row["owner_ms"]) == set(ROLES) and min(row["owner_ms"].values()) >= 0
        assert row["owner_total_ms"] == pytest.approx(sum(row["owner_ms"].values()))
        if row["owner_total_ms"] > 0:
            assert row["owner_cap_req_s"] == pytest.approx(1000 / row["owner_total_ms"])
        # One process has no front ends; with --workers 2 both were found and read.
        assert row["front_end_processes"] == (0 if row["serve_workers"] == 1 else 2)
        if row["serve_workers"] == 1:
            assert row["front_ends_ms"] == 0 and row["busiest_front_end"] is None
        else:
            assert 0.5 <= row["busiest_front_end"] <= 1
    alone = report["overhead"]["owner_alone"]
    assert [(r["in_flight"], r["event_loop"]) for r in alone] == [
        (1, "uvloop"),
        (1, "asyncio"),
        (4, "uvloop"),
        (4, "asyncio"),
    ]
    for r in alone:  # every request answered; batches never hold more than is in flight
        assert r["req_s"] > 0 and 1 <= r["mean_batch"] <= r["in_flight"]
        assert set(r["owner_ms"]) == {"event_loop", "instances", "runtime_pool"}
    text = capsys.readouterr().out
    assert "Server CPU per request (ms), near-free model" in text and "owner cap req/s" in text
    assert "The owner alone, fed by a stand-in front end" in text
    assert (out / "overhead.md").exists() and (out / "overhead_owner_cap.png").stat().st_size > 0
