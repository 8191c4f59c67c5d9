"""Every shell command in README.md is either run here, by this test, or listed with why not.

The commands are read from the README's ```bash blocks (continuation lines joined, comments
dropped). Each must match exactly one entry of HERE, WITH_SERVER or ELSEWHERE, and every entry
must match some command, so the lists cannot go stale in either direction:

- HERE: run in README order in one temporary folder (so `hrnet data` feeds `hrnet train` feeds
  `hrnet eval`), each must exit 0. Training is shortened only through documented flags
  appended to the command; bracketed optional parts of a synopsis are left out.
- WITH_SERVER: the curl examples, run by bash as written, in README order in one folder holding
  `digit.png`, against a real server serving the test model as `digits` on free ports (the
  README's `localhost:8000/8001/8002` replaced by its addresses); each must exit 0 and print
  what its entry expects.
- ELSEWHERE: cannot run here (Docker, kubectl, accelerators, ImageNet or downloaded weights,
  servers on fixed ports, `make` itself), each with the reason and the test that covers it
  instead; the named test must exist.

Docker and kubectl commands are still checked for what can be checked without the tools: the
targets, build arguments and HRNET_* settings they name exist, and so do the files they apply.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


@dataclass(frozen=True)
class Here:
    """Run it; `shorten` holds documented flags appended to cut a long run down."""

    shorten: tuple[str, ...] = ()


@dataclass(frozen=True)
class WithServer:
    """Run against a real server; `expect` must be in what it prints."""

    expect: str


@dataclass(frozen=True)
class Elsewhere:
    reason: str
    covered_by: str | None  # "tests/path.py::test_name", or None when nothing can stand in


HERE: dict[str, Here] = {
    r"hrnet data digits --out runs/data/digits": Here(),
    r"hrnet train --config hrnet_digits": Here(("--steps-per-epoch", "2", "--eval-interval", "4")),
    r"hrnet eval --ckpt runs/digits/checkpoints/hrnet_w18_small_v1-e0004\.ckpt --data runs/data/digits/val": (
        Here()
    ),
    r"hrnet info --arch w48 .*": Here(),
}

WITH_SERVER: dict[str, WithServer] = {
    r"curl -s localhost:8000/v2/health/ready -o /dev/null -w .*": WithServer("200"),
    r"curl -s localhost:8000/v2/models/digits": WithServer('"datatypes": "FP32,FP16,UINT8,BYTES"'),
    r"echo .* > request\.json": WithServer(""),
    r"curl -s localhost:8000/v2/models/digits/infer -d @request\.json": WithServer('"shape":[1,3]'),
    r"curl -s localhost:8000/v2/models/digits/stats": WithServer('"inference_count": 1,'),
    r"curl -s localhost:8002/readyz": WithServer("ready"),
    r"curl -s localhost:8000/v2/trace/setting -d .*": WithServer('"trace_rate": "100"'),
}

ELSEWHERE: dict[str, Elsewhere] = {
    r"make test": Elsewhere("runs the whole suite, this test included", None),
    r"make demo": Elsewhere(
        "the full demo trains for two minutes",
        "tests/test_demo.py::test_demo_runs_every_stage_and_stops_the_server",
    ),
    r"pip install .*": Elsewhere(
        "installs into the environment; `make` runs exactly this before the tests", None
    ),
    r"export PATH=.*": Elsewhere("shell setup of the msrun recipe that follows", None),
    r"msrun .*hrnet_w48_imagenet.*": Elsewhere(
        "8 Ascend devices per node and ImageNet (the same launcher with 2 CPU workers runs instead)",
        "tests/training/test_train.py::test_msrun_two_workers_shard_data_and_end_identical",
    ),
    r"hrnet export --ckpt (runs/w48/best|w48_imagenet)\.ckpt .*": Elsewhere(
        "needs a W48 ImageNet checkpoint (AIR also an Ascend device)",
        "tests/training/test_export.py::test_cli_fixed_batch_then_force_overwrite",
    ),
    r"hrnet export --ckpt CKPT .*": Elsewhere(
        "a synopsis: CKPT and DIR stand for a checkpoint and image folders",
        "tests/training/test_precision.py::test_int8_and_fp16_serve_without_flags_and_score_as_the_gate_did",
    ),
    r"hrnet convert .*": Elsewhere(
        "needs downloaded ImageNet weights or a W48 run",
        "tests/training/test_convert.py::test_cli_round_trip_and_force",
    ),
    r"hrnet serve .*": Elsewhere(
        "serves until stopped, on fixed ports shared with other work, a W48 export",
        "tests/deploy/test_dockerfile.py::test_entrypoint_and_healthcheck_run_as_written",
    ),
    r"hrnet bench gpu prepare .*": Elsewhere(
        "exports W48 at 224 twice through MindSpore (minutes)",
        "tests/serving/test_engine.py::test_fp16_models_serve_with_no_flags",
    ),
    r"hrnet bench gpu run .*": Elsewhere(
        "needs a GPU and the W48 exports above; the same run on CPU with the small test model",
        "tests/benchmarks/test_gpu_serving.py::test_every_section_runs_and_is_written_as_it_finishes",
    ),
    r"hrnet classify photo\.jpg": Elsewhere(
        "needs the W48 server above", "tests/clients/test_classify_cli.py::test_tables_for_named_files"
    ),
    r"hrnet bench soak .*": Elsewhere(
        "minutes of overload on both cores, and the demo's export",
        "tests/benchmarks/test_soak.py::test_a_short_soak_at_twice_capacity_holds_every_property",
    ),
    r"HRNET_FUZZ_EXAMPLES=\d+ pytest .*": Elsewhere(
        "a longer fuzz run (minutes); 40 examples per test run in make test",
        "tests/serving/test_fuzz.py::test_zz_report_what_the_fuzzer_saw",
    ),
    r"docker build .*": Elsewhere(
        "no Docker engine here", "tests/deploy/test_dockerfile.py::test_hadolint_passes"
    ),
    r"docker run .*": Elsewhere(
        "no Docker engine here",
        "tests/deploy/test_dockerfile.py::test_entrypoint_and_healthcheck_run_as_written",
    ),
    r"kubectl (apply|create) .*": Elsewhere(
        "no cluster here", "tests/deploy/test_manifests.py::test_manifest_is_valid"
    ),
    r"hrnet bench load --model w48\.onnx --device gpu .*": Elsewhere(
        "a GPU and a W48 export",
        "tests/benchmarks/test_bench.py::test_load_sweep_writes_reports_that_parse_back",
    ),
    r"hrnet bench load --url triton:8001 .*": Elsewhere(
        "a running Triton and an ImageNet val folder",
        "tests/benchmarks/test_bench.py::test_load_against_a_running_server_by_url",
    ),
    r"hrnet bench ceiling --model w48_fp32\.onnx .*": Elsewhere(
        "a GPU and W48 fp32 and fp16 exports",
        "tests/benchmarks/test_bench.py::test_ceiling_reports_several_files_side_by_side",
    ),
    r"hrnet bench accuracy --model runs/demo/.*": Elsewhere(
        "needs `make demo`'s checkpoint and export (minutes of training)",
        "tests/benchmarks/test_bench.py::test_accuracy_through_the_server_equals_hrnet_eval",
    ),
    r"bash benchmarks/results/w18_small_v1_224_cpu\.sh .*": Elsewhere(
        "ten minutes of measurement, meant for a quiet machine",
        "tests/benchmarks/test_bench.py::test_peers_runs_mlserver_beside_ours",
    ),
}


def readme_lines() -> list[tuple[str, str]]:
    """(command, line): the command normalised (quotes resolved, comment dropped) for matching,
    and the line as written (continuations joined) for bash."""
    text = README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append((" ".join(words), line))
    return commands


def readme_commands() -> list[str]:
    return [command for command, _ in readme_lines()]


def _verdict(command: str) -> tuple[str, Here | WithServer | Elsewhere]:
    tables = (HERE, WITH_SERVER, ELSEWHERE)
    found = [(p, v) for table in tables for p, v in table.items() if re.fullmatch(p, command)]
    assert len(found) == 1, (
        f"README command {command!r} matches {len(found)} entries of tests/test_readme.py: "
        "add it to HERE (run here), WITH_SERVER (run against a server) or ELSEWHERE (why not, and "
        "which test covers it)"
    )
    return found[0]


COMMANDS = readme_commands()


def test_every_command_is_run_here_or_accounted_for() -> None:
    assert len(COMMANDS) > 20
    used = {_verdict(c)[0] for c in COMMANDS}
    stale = set(HERE) | set(WITH_SERVER) | set(ELSEWHERE)
    assert not stale - used, f"entries matching no README command: {sorted(stale - used)}"
    for verdict in ELSEWHERE.values():
        if verdict.covered_by:
            path, _, name = verdict.covered_by.partition("::")
            assert f"def {name}(" in (REPO / path).read_text(encoding="utf-8"), verdict.covered_by


def test_shortening_flags_are_documented() -> None:
    text = README.read_text(encoding="utf-8")
    assert "every config key is also a flag" in text
    for here in HERE.values():
        for flag in here.shorten[::2]:
            assert f"`{flag[2:].replace('-', '_')}`" in text, f"{flag} is not documented in README.md"


def test_docker_and_kubectl_commands_name_what_exists() -> None:
    from core.settings import leaves
    from serving.config import ENV_PREFIX, ServerConfig

    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.M))
    build_args = set(re.findall(r"^ARG (\w+)", dockerfile, re.M))
    settings = {leaf.variable(ENV_PREFIX) for leaf in leaves(ServerConfig)}
    for command in COMMANDS:
        words = shlex.split(command)
        if words[:2] == ["docker", "build"]:
            assert words[words.index("--target") + 1] in targets, command
            for arg in (words[i + 1] for i, w in enumerate(words) if w == "--build-arg"):
                assert arg.split("=")[0] in build_args, command
        if words[:2] == ["docker", "run"]:
            for env in (words[i + 1] for i, w in enumerate(words) if w == "-e"):
                assert env.split("=")[0] in settings, f"{env} is not a server setting: {command}"
        if words[0] == "kubectl" and "-f" in words:
            assert (REPO / words[words.index("-f") + 1]).exists(), command


def _argv(pattern: str, command: str, here: Here) -> list[str]:
    """The command as written, without a synopsis' [optional] parts, plus the shortening flags."""
    return shlex.split(re.sub(r"\s*\[[^\]]*\]", "", command)) + list(here.shorten)


def test_runnable_commands_run(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HRNET_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(REPO)
    ran = []
    for command in COMMANDS:
        pattern, verdict = _verdict(command)
        if not isinstance(verdict, Here):
            continue
        argv = _argv(pattern, command, verdict)
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (
            f"{shlex.join(argv)} exited {result.returncode}:\n{result.stderr[-3000:]}"
        )
        ran.append((argv, result.stdout))
    assert len(ran) == len(HERE)
    outputs = dict((argv[1], out) for argv, out in ran)
    assert "Top_1_Acc" in outputs["eval"]
    assert "77,469,864" in outputs["info"]  # W48's trainable parameters, as the README's table says


@pytest.mark.parametrize("command", ["hrnet info --arch w48 [--num-classes 1000] [--input-size 224]"])
def test_synopsis_options_are_dropped(command: str) -> None:
    assert _argv("", command, Here()) == ["hrnet", "info", "--arch", "w48"]


def test_curl_commands_run_against_a_server(start_server, model_repo, digit_images, tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed here")
    repo = tmp_path / "repo"
    (repo / "digits" / "1").mkdir(parents=True)
    shutil.copy(model_repo.onnx, repo / "digits" / "1" / "model.onnx")
    running = start_server(repo)
    work = tmp_path / "work"
    work.mkdir()
    (work / "digit.png").write_bytes(digit_images[3].png)
    addresses = {
        "localhost:8000": running.http_address,
        "localhost:8001": running.address,
        "localhost:8002": f"127.0.0.1:{running.metrics_port}",
    }
    ran = set()
    for command, line in readme_lines():
        pattern, verdict = _verdict(command)
        if not isinstance(verdict, WithServer):
            continue
        for readme, real in addresses.items():
            line = line.replace(readme, real)
        result = subprocess.run(["bash", "-c", line], cwd=work, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{line} exited {result.returncode}: {result.stderr[-2000:]}"
        assert verdict.expect in result.stdout, f"{line} printed {result.stdout[-2000:]!r}"
        ran.add(pattern)
    assert ran == set(WITH_SERVER)


def test_every_run_checkpoint_named_is_one_training_writes() -> None:
    """The README once quoted `runs/w48/last.ckpt`, which no run writes: a run has best.ckpt and
    checkpoints/hrnet_<arch>-eNNNN.ckpt."""
    from training.runs import BEST_CKPT, CKPT_DIR, CKPT_PATTERN

    named = re.findall(r"runs/[\w./-]+?\.ckpt\b", README.read_text(encoding="utf-8"))
    assert named
    for path in map(Path, named):
        in_run = path.name == BEST_CKPT or (path.parent.name == CKPT_DIR and CKPT_PATTERN.match(path.name))
        assert in_run, f"README names {path}, which hrnet train never writes"
