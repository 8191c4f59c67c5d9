"""The `hrnet` command itself: dispatch, help, and one-line errors instead of tracebacks."""

from __future__ import annotations

import subprocess
import sys

import pytest


def hrnet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hrnet", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_every_subcommand() -> None:
    result = hrnet("--help")
    assert result.returncode == 0
    for name in ("info", "train", "eval", "export", "convert", "serve", "classify", "bench", "demo"):
        assert f"  {name}" in result.stdout


def test_unknown_command_exits_2() -> None:
    result = hrnet("frobnicate")
    assert result.returncode == 2
    assert "unknown command 'frobnicate'" in result.stderr


@pytest.mark.slow  # 3-5 s: hrnet info in a process of its own builds the network
def test_info_prints_exact_counts() -> None:
    result = hrnet("info", "--arch", "w18_small_v1", "--num-classes", "10", "--input-size", "64")
    assert result.returncode == 0, result.stderr
    assert "hrnet_w18_small_v1" in result.stdout
    # 1000-class count minus the classifier rows that 10 classes do not have.
    assert f"trainable params   {13_187_464 - 990 * 2049:,}" in result.stdout
    assert "MACs per image" in result.stdout


@pytest.mark.slow  # 3-5 s: two hrnet processes importing MindSpore
def test_info_rejects_bad_arguments_without_traceback() -> None:
    result = hrnet("info", "--arch", "w99")
    assert result.returncode == 2
    assert "unknown architecture 'w99'" in result.stderr
    assert "Traceback" not in result.stderr
    result = hrnet("info", "--num-classes", "0")
    assert result.returncode == 2
    assert "--num-classes must be >= 1" in result.stderr


def test_every_option_with_a_default_says_it_in_help() -> None:
    import argparse
    import importlib

    from hrnet.cli import COMMANDS

    def silent(parser: argparse.ArgumentParser) -> list[str]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                found += [line for sub in action.choices.values() for line in silent(sub)]
            elif not action.option_strings or action.default in (None, False, "", argparse.SUPPRESS):
                continue
            elif "default" not in (action.help or ""):
                found.append(f"{parser.prog} {action.option_strings[-1]} (default {action.default!r})")
        return found

    missing = []
    for name, command in COMMANDS.items():
        parser = argparse.ArgumentParser(prog=f"hrnet {name}")
        importlib.import_module(command.module).add_arguments(parser)
        missing += silent(parser)
    assert not missing, missing
