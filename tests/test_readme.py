"""What README.md and every docs/*.md page show is true: the commands, flags, links and settings.

The pages are README.md, then docs/*.md in name order. Their shell commands are read from the
```bash blocks (continuation lines joined, comments dropped). Each must match exactly one entry
of HERE, WITH_SERVER or ELSEWHERE, and every entry must match some command, so the lists cannot
go stale in either direction:

- HERE: run in page order in one temporary folder (so `hrnet data` feeds `hrnet train` feeds
  `hrnet export` and `hrnet eval`), each must exit 0; a command shown on two pages runs once.
  Training is shortened only through documented flags appended to the command; bracketed
  optional parts of a synopsis are left out.
- WITH_SERVER: the curl examples, run by bash as written, in page order in one folder holding
  `digit.png`, against a real server serving the test model as `digits` on free ports (the
  pages' `localhost:8000/8001/8002` replaced by its addresses); each must exit 0 and print
  what its entry expects.
- ELSEWHERE: cannot run here (Docker, kubectl, accelerators, ImageNet or downloaded weights,
  servers on fixed ports, `make` itself), each with the reason and the test that covers it
  instead; the named test must exist.

Docker and kubectl commands are still checked for what can be checked without the tools: the
targets, build arguments and HRNET_* settings they name exist, and so do the files they apply.

Beyond the commands run: every `hrnet ...` command a page shows (in a bash block, a text
synopsis or inline code) names subcommands and flags its `--help` lists; every relative link
resolves, #anchors included; every key of a ```yaml block is a `config.yaml` key, every
`HRNET_*` variable named is a setting, and every field the seed's training keys map to exists;
README.md links every docs/ page and is at most 250 lines.
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
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 250


def page_name(page: Path) -> str:
    return str(page.relative_to(REPO))


def all_text() -> str:
    return "\n".join(page.read_text(encoding="utf-8") for page in PAGES)


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
    r"hrnet export --ckpt runs/digits/best\.ckpt --format ONNX --out digits\.onnx": Here(),
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
    r"make check": Elsewhere("runs the suite but the tests marked slow, this test included", None),
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
        "serves until stopped, on fixed ports shared with other work (most examples: a W48 export)",
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
    r"hrnet classify runs/data/digits/val/3": Elsewhere(
        "needs the server of the README's example, which serves until stopped",
        "tests/clients/test_classify_cli.py::test_json_lines_for_a_folder_with_a_corrupt_image",
    ),
    r"hrnet bench load --model digits\.onnx .*": Elsewhere(
        "a sweep of a minute and more on both cores",
        "tests/benchmarks/test_bench.py::test_load_sweep_writes_reports_that_parse_back",
    ),
    r"hrnet bench overhead .*": Elsewhere(
        "six servers under load for a minute and more on both cores",
        "tests/benchmarks/test_overhead.py::test_one_and_two_processes_measured_split_and_reported",
    ),
    r"hrnet bench tune --model digits\.onnx .*": Elsewhere(
        "a dozen servers measured for up to ten minutes on both cores",
        "tests/benchmarks/test_tune.py::test_a_tune_writes_a_served_configuration_and_resumes",
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
    r"bash benchmarks/reports/tune_cpu\.sh .*": Elsewhere(
        "two 600 s tunes on both cores, after make demo",
        "tests/benchmarks/test_tune.py::test_a_tune_writes_a_served_configuration_and_resumes",
    ),
    r"bash benchmarks/reports/w18_small_v1_224_cpu\.sh .*": Elsewhere(
        "ten minutes of measurement, meant for a quiet machine",
        "tests/benchmarks/test_bench.py::test_peers_runs_mlserver_beside_ours",
    ),
}


def page_lines() -> list[tuple[Path, str, str]]:
    """(page, command, line): the command normalised (quotes resolved, comment dropped) for
    matching, and the line as written (continuations joined) for bash."""
    commands = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                words = shlex.split(line, comments=True)
                if words:
                    commands.append((page, " ".join(words), line))
    return commands


def page_commands() -> list[str]:
    return [command for _, command, _ in page_lines()]


def _verdict(command: str) -> tuple[str, Here | WithServer | Elsewhere]:
    tables = (HERE, WITH_SERVER, ELSEWHERE)
    found = [(p, v) for table in tables for p, v in table.items() if re.fullmatch(p, command)]
    assert len(found) == 1, (
        f"command {command!r} (README.md or docs/) matches {len(found)} entries of "
        "tests/test_readme.py: add it to HERE (run here), WITH_SERVER (run against a server) or "
        "ELSEWHERE (why not, and which test covers it)"
    )
    return found[0]


COMMANDS = page_commands()


def test_every_command_is_run_here_or_accounted_for() -> None:
    assert len(COMMANDS) > 20
    used = {_verdict(c)[0] for c in COMMANDS}
    stale = set(HERE) | set(WITH_SERVER) | set(ELSEWHERE)
    assert not stale - used, f"entries matching no command of the pages: {sorted(stale - used)}"
    for verdict in ELSEWHERE.values():
        if verdict.covered_by:
            path, _, name = verdict.covered_by.partition("::")
            assert f"def {name}(" in (REPO / path).read_text(encoding="utf-8"), verdict.covered_by


def test_shortening_flags_are_documented() -> None:
    text = all_text()
    assert "every config key is also a flag" in text
    for here in HERE.values():
        for flag in here.shorten[::2]:
            assert f"`{flag[2:].replace('-', '_')}`" in text, f"{flag} is documented on no page"


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
    for command in dict.fromkeys(COMMANDS):  # in page order, a command shown twice run once
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
    for _, command, line in page_lines():
        pattern, verdict = _verdict(command)
        if not isinstance(verdict, WithServer):
            continue
        for shown, real in addresses.items():
            line = line.replace(shown, real)
        result = subprocess.run(["bash", "-c", line], cwd=work, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{line} exited {result.returncode}: {result.stderr[-2000:]}"
        assert verdict.expect in result.stdout, f"{line} printed {result.stdout[-2000:]!r}"
        ran.add(pattern)
    assert ran == set(WITH_SERVER)


def test_every_run_checkpoint_named_is_one_training_writes() -> None:
    """The README once quoted `runs/w48/last.ckpt`, which no run writes: a run has best.ckpt and
    checkpoints/hrnet_<arch>-eNNNN.ckpt."""
    from training.runs import BEST_CKPT, CKPT_DIR, CKPT_PATTERN

    named = re.findall(r"runs/[\w./-]+?\.ckpt\b", all_text())
    assert named
    for path in map(Path, named):
        in_run = path.name == BEST_CKPT or (path.parent.name == CKPT_DIR and CKPT_PATTERN.match(path.name))
        assert in_run, f"the pages name {path}, which hrnet train never writes"


# --- `hrnet` commands against their --help -------------------------------------------------


def shown_hrnet_commands() -> list[tuple[Path, str]]:
    """(page, command) for every `hrnet ...` a page shows: bash lines (comments dropped), text
    synopses (a line starting `hrnet `, with the indented lines under it) and inline code,
    but not quoted messages (`hrnet export: error: ...`)."""
    shown = [(page, command) for page, command, _ in page_lines() if command.startswith("hrnet ")]
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for block in re.findall(r"```text\n(.*?)```", text, re.S):
            for synopsis in re.findall(r"^hrnet .*(?:\n[ \t]+\S.*)*", block, re.M):
                shown.append((page, " ".join(synopsis.split())))
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        codes = re.findall(r"`(hrnet [^`]+)`", prose)
        shown += [(page, code) for code in codes if not re.match(r"hrnet [\w ]+: ", code)]  # not messages
    return shown


def _help(path: tuple[str, ...], cache: dict[tuple[str, ...], str] = {}) -> str:  # noqa: B006
    if path not in cache:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HRNET_")}
        result = subprocess.run(
            [sys.executable, "-m", "hrnet", *path, "--help"],
            cwd=REPO,
            env={**env, "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"hrnet {' '.join(path)} --help: {result.stderr[-2000:]}"
        cache[path] = result.stdout
    return cache[path]


def subcommand_and_flags(command: str) -> tuple[tuple[str, ...], list[str]]:
    """The subcommand path (`bench`, `gpu`, `run`) as the parents' help lists it, and the
    lowercase --flags named (not those inside quotes, which belong to another command)."""
    unquoted = re.sub(r"'[^']*'|\"[^\"]*\"", "", command)
    words = unquoted.split()[1:]
    path: tuple[str, ...] = ()
    for word in words:
        if not re.fullmatch(r"[a-z]+", word) or not re.search(rf"^\s+{word}(\s|$)", _help(path), re.M):
            break
        path += (word,)
    return path, re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", unquoted)


def test_every_hrnet_command_shown_exists_with_its_flags() -> None:
    shown = shown_hrnet_commands()
    assert len(shown) > 60
    wrong = []
    for page, command in dict.fromkeys(shown):
        path, flags = subcommand_and_flags(command)
        if not path:
            wrong.append(f"{page_name(page)}: {command!r} names no hrnet subcommand")
            continue
        usage = _help(path)
        for flag in flags:
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", usage):
                wrong.append(f"{page_name(page)}: {command!r}: hrnet {' '.join(path)} has no {flag}")
    assert not wrong, "\n".join(wrong)


def test_the_flag_check_sees_subcommands_and_quotes() -> None:
    assert subcommand_and_flags("hrnet bench gpu run --model a=b.onnx [--budget-s 540]") == (
        ("bench", "gpu", "run"),
        ["--model", "--budget-s"],
    )
    assert subcommand_and_flags("hrnet data digits --out d [--serve-args '--instances 2']") == (
        ("data",),
        ["--out", "--serve-args"],
    )


# --- links, pages and settings ---------------------------------------------------------------


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation but - and _ dropped, spaces to -."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#{1,6} (.+)$", text, re.M)
    }


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"^\[[^\]]+\]: (\S+)", text, re.M)
    return [t for t in targets if not re.match(r"[a-z][a-z+.-]*:", t)]


def test_every_relative_link_resolves() -> None:
    wrong, count = [], 0
    for page in PAGES:
        for target in relative_links(page):
            count += 1
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                wrong.append(f"{page_name(page)}: {target}: no such file")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                wrong.append(f"{page_name(page)}: {target}: no heading #{anchor} in {path.name}")
    assert count > 20
    assert not wrong, "\n".join(wrong)


def test_anchors_are_made_as_github_makes_them(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text(
        "# Benchmarks: `hrnet bench`\n## HTTP/REST\n## Front-end processes and sizing --workers\n"
    )
    assert anchors(page) == {"benchmarks-hrnet-bench", "httprest", "front-end-processes-and-sizing---workers"}


def test_readme_links_every_docs_page_and_fits_a_screenful_or_few() -> None:
    assert DOCS, "docs/ holds no pages"
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README)}
    assert not set(DOCS) - linked, f"README.md links no {sorted(map(page_name, set(DOCS) - linked))}"
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines, more than {README_MAX_LINES}"


def _unknown_keys(data: object, cls: type, where: str) -> list[str]:
    """Keys of a YAML mapping that are no field of `cls`, nested dataclasses followed."""
    import dataclasses
    import typing

    if not isinstance(data, dict):
        return [f"{where}: not a mapping"]
    hints = typing.get_type_hints(cls)
    wrong = []
    for key, value in data.items():
        if key not in hints:
            wrong.append(f"{where}{key}")
        elif dataclasses.is_dataclass(hints[key]):
            wrong += _unknown_keys(value, hints[key], f"{where}{key}.")
    return wrong


def test_every_config_yaml_key_shown_exists() -> None:
    """A block with `model_defaults` is a server file (`--config`); the rest are a model's config.yaml."""
    import yaml

    from serving.config import ModelConfig, ServerConfig

    blocks = [(page, b) for page in PAGES for b in re.findall(r"```yaml\n(.*?)```", page.read_text(), re.S)]
    assert len(blocks) >= 2
    for page, block in blocks:
        data = yaml.safe_load(block)
        cls = ServerConfig if isinstance(data, dict) and "model_defaults" in data else ModelConfig
        wrong = _unknown_keys(data, cls, "")
        assert not wrong, f"{page_name(page)}: keys {cls.__name__} does not have: {wrong}"


def test_every_hrnet_variable_named_is_a_setting() -> None:
    from core.settings import leaves
    from serving.config import ENV_PREFIX, ServerConfig
    from training.config import ENV_PREFIX as TRAIN_PREFIX
    from training.config import TrainConfig

    settings = {leaf.variable(ENV_PREFIX) for leaf in leaves(ServerConfig)}
    settings |= {leaf.variable(TRAIN_PREFIX) for leaf in leaves(TrainConfig)}
    not_settings = {"HRNET_FUZZ_EXAMPLES", "HRNET_SLOW_TESTS"}  # read by the tests, documented as such
    named = set(re.findall(r"\bHRNET_[A-Z0-9_]*[A-Z0-9]\b", all_text())) - not_settings
    assert len(named) > 5
    assert not named - settings, f"named but no setting: {sorted(named - settings)}"


def test_every_field_the_seed_keys_map_to_exists() -> None:
    import dataclasses

    from training.config import TrainConfig

    text = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    mapping = text[text.index("The seed's config keys map to these fields") :].split("\n\n")[0]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    targets = re.findall(r"` -> `(\w+)`", mapping)
    new = re.sub(r"\([^)]*\)", "", mapping[mapping.index("New:") :])  # values in brackets dropped
    targets += re.findall(r"`(\w+)`", new)
    assert len(targets) >= 20
    assert not set(targets) - fields, f"no such TrainConfig field: {sorted(set(targets) - fields)}"
