"""core.settings on a toy config: the mapping type, from YAML, a flag and a variable, merged key by key."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from core.errors import ConfigError
from core.settings import add_flags, build, env_values, flag_values, merge, setting


@dataclass(frozen=True)
class Inner:
    limits: dict[str, dict[str, int]] = setting({"a": {"x": 1}}, "per-name limits, e.g. 100%")


@dataclass(frozen=True)
class Outer:
    name: str = setting("n", "a name")
    inner: Inner = field(default_factory=Inner)


def test_mapping_defaults_are_copies_per_instance() -> None:
    one, two = Outer(), Outer()
    assert one.inner.limits == {"a": {"x": 1}}
    one.inner.limits["a"]["x"] = 5
    assert two.inner.limits == {"a": {"x": 1}}


def test_mapping_from_yaml_flag_and_variable_merges_key_by_key() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser, Outer, "settings")
    assert "MAPPING" in parser.format_help() and "100%" in parser.format_help()
    flags = flag_values(parser.parse_args(["--limits", "{a: {y: 3}}"]), Outer)
    env = env_values({"T_LIMITS": "{b: {z: '4'}}"}, Outer, "T_")
    yaml_data = {"inner": {"limits": {"a": {"x": 2}, "c": {}}}}
    config = build(Outer, merge(merge(yaml_data, env), flags), "test")
    assert config.inner.limits == {"a": {"x": 2, "y": 3}, "b": {"z": 4}, "c": {}}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[1, 2]", r"limits: expected a mapping like \{key: value\}, got \[1, 2\]"),
        ("{a: {x: many}}", "limits.a.x: expected int, got 'many'"),
        ("{a: [", "limits: not a YAML mapping"),
    ],
)
def test_bad_mappings_name_the_key(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(Outer, {"inner": {"limits": value}}, "test")
