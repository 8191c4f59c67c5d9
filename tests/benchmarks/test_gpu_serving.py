"""`hrnet bench gpu run`, the GPU measurement, rehearsed on CPU with the small test model: every
section runs and writes its results, and the budget skips what no longer fits instead of
overrunning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hrnet.cli import main
from serving.config import load_server_config

pytestmark = pytest.mark.slow  # starts hrnet serve and measures load levels: ~20 s

SECTIONS = ["environment", "small: ceiling", "small: server raw", "small: server jpeg"]


def test_every_section_runs_and_is_written_as_it_finishes(model_repo, tmp_path) -> None:
    out = tmp_path / "out"
    args = ["bench", "gpu", "run", "--model", f"small={model_repo.onnx}", "--device", "cpu"]
    args += ["--concurrency", "4", "--workers", "1", "--max-batch-size", "4", "--duration", "1"]
    assert main([*args, "--warmup", "0.5", "--ceiling-seconds", "0.05", "--out", str(out)]) == 0
    sections = {r["section"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert list(sections) == SECTIONS
    ceiling = sections["small: ceiling"]
    assert list(ceiling["buckets"]) == ["1", "2", "4"] and ceiling["padding_max_abs_diff"] < 1e-4
    assert ceiling["cpu_same_top1"] and ceiling["runtime"]["providers"] == "CPUExecutionProvider"
    for kind in ("raw", "jpeg"):
        load = sections[f"small: server {kind}"]
        assert load["img_s"] > 0 and not load["errors"] and 1 <= load["mean_batch"] <= 4
        assert load["ratio_to_ceiling"] > 0 and float(load["server_warmup_s"]) >= 0
    report = (out / "report.md").read_text()
    assert "server/ceiling" in report and "page-locked: False" in report and "batches run" in report


def test_a_spent_budget_skips_sections_and_says_so(model_repo, tmp_path) -> None:
    out = tmp_path / "out"
    args = ["bench", "gpu", "run", "--model", f"small={model_repo.onnx}", "--device", "cpu"]
    assert main([*args, "--budget-s", "1", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["section"] for r in records] == SECTIONS
    environment, *measured = records
    assert "skipped" not in environment  # nothing to measure: it always runs
    for r in measured:  # recorded as skipped and nothing else: no figure was taken
        assert r == {"section": r["section"], "skipped": "time budget spent"}
    report = (out / "report.md").read_text()
    for section in SECTIONS[1:]:
        assert f"## {section}\n\nskipped: time budget spent\n" in report


def test_the_tune_section_writes_a_configuration_for_the_card(model_repo, tmp_path) -> None:
    """`--tune-p99-ms` runs `hrnet bench tune` after the model's sections, on the same device: with
    a budget this small only the defaults are measured, and still checked, written and reported."""
    out = tmp_path / "out"
    args = ["bench", "gpu", "run", "--model", f"small={model_repo.onnx}", "--device", "cpu", "--sections", ""]
    args += ["--workers", "1", "--tune-p99-ms", "5000", "--tune-budget-s", "15", "--out", str(out)]
    quick = f"--concurrency 1,2 --warmup 0.2 --duration 0.5 --rounds 1 --cache {tmp_path / 'cache'}"
    assert main([*args, f"--tune-args={quick}"]) == 0  # with "=": the value starts with --
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["section"] for r in records] == ["environment", "small: tune"]
    tune = records[1]
    assert tune["chosen"] and tune["verify"]["chosen_img_s"] > 0 and tune["budget_s"] <= 15
    config = load_server_config(out / "tune-small" / "serving.yaml", env={})
    assert (
        Path(config.model) == model_repo.onnx.resolve()
        or Path(config.model).resolve() == model_repo.onnx.resolve()
    )
    assert "written:" in (out / "tune-small" / "tune.md").read_text()
    assert "## small: tune" in (out / "report.md").read_text()
