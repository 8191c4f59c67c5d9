"""Typed settings: dataclasses with working defaults, filled from YAML, the environment and flags.

The server's and the trainer's configs are plain dataclasses whose fields carry their help text
(`setting(default, "why")`). This module is the one way to fill them: every source becomes
plain nested data, `merge` lays the sources over each other in the caller's order, and `build`
checks every key and converts every value against the type hints, so a typo or a bad value is
reported with its key and source instead of surfacing later. One command-line flag and one
environment variable per leaf field are generated from the same fields, with the same name:
`model_defaults.batching.max_batch_size` is `--max-batch-size` and `HRNET_MAX_BATCH_SIZE`.
Adding a setting is adding a field. A `dict[str, T]` field is one leaf too: in YAML a mapping,
on a command line or in a variable the same mapping in YAML flow style (`{a: {b: 1}}`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import logging
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.errors import ConfigError

log = logging.getLogger(__name__)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def setting(default: Any, help: str = "", *, flag: str = "", secret: bool = False) -> Any:
    """A dataclass field with its help text. `flag` renames its flag and variable (default: the field
    name); `secret` keeps it off the command line, where `ps` would show it (YAML and environment only).
    A mapping default is copied for each instance.
    """
    metadata = {"help": help, "flag": flag, "secret": secret}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# --- plain data -> dataclass ------------------------------------------------------------------


def build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """Instantiate dataclass `cls` from plain data (YAML, env strings, flags), checking keys and types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(known)}"
        )
    values = {name: _coerce(hints[name], value, f"{where}: {name}") for name, value in data.items()}
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is dict:
        return _coerce_mapping(hint, value, where)
    try:
        if origin is tuple:
            args = [a for a in typing.get_args(hint) if a is not Ellipsis]
            items = value.split(",") if isinstance(value, str) else list(value)
            items = [v.strip() if isinstance(v, str) else v for v in items]
            items = [v for v in items if v != ""]
            if len(args) > 1 and len(items) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(items)}: {value!r}")
            types_ = args if len(args) > 1 else args * len(items)
            return tuple(_coerce(t, v, where) for t, v in zip(types_, items, strict=True))
        if origin in (typing.Union, types.UnionType):
            raise ConfigError(f"{where}: unsupported type {hint}")
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in _TRUE + _FALSE:
                    raise ValueError(value)
                return value.lower() in _TRUE
            if not isinstance(value, bool | int):
                raise ValueError(value)
            return bool(value)
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if hint is str:
            if isinstance(value, Mapping | list):
                raise ValueError(value)
            return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}") from None
    raise ConfigError(f"{where}: unsupported type {hint}")


def _coerce_mapping(hint: Any, value: Any, where: str) -> dict[str, Any]:
    """`dict[str, T]`: a mapping, or its YAML flow text (`{a: 1, b: 2}`) from a flag or a variable."""
    key_type, value_type = typing.get_args(hint)
    if key_type is not str:
        raise ConfigError(f"{where}: unsupported type {hint}")
    value = _parse_mapping(value, where)
    return {str(k): _coerce(value_type, v, f"{where}.{k}") for k, v in value.items()}


def _parse_mapping(value: Any, where: str) -> Mapping[str, Any]:
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: not a YAML mapping: {exc}") from None
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping like {{key: value}}, got {value!r}")
    return value


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge `top` over `base` (nested mappings merge, everything else replaces)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def as_data(instance: Any) -> dict[str, Any]:
    """A dataclass as plain nested data (tuples become lists), fit for YAML and for `build` again."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(instance))


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


# --- flags and environment: one name per leaf field -------------------------------------------


@dataclass(frozen=True)
class Leaf:
    """One settable value: where it sits in the nested config and what it is called outside."""

    path: tuple[str, ...]
    name: str  # flag name without dashes, e.g. "max-batch-size"
    hint: Any
    default: Any
    help: str
    secret: bool

    @property
    def option(self) -> str:
        return f"--{self.name}"

    def variable(self, prefix: str) -> str:
        return prefix + self.name.replace("-", "_").upper()


def leaves(cls: type, prefix: tuple[str, ...] = ()) -> Iterator[Leaf]:
    """Every leaf field of `cls`, nested dataclass fields flattened (their names must stay unique)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(hint):
            yield from leaves(hint, (*prefix, f.name))
            continue
        yield Leaf(
            path=(*prefix, f.name),
            name=f.metadata.get("flag") or f.name.replace("_", "-"),
            hint=hint,
            default=default,
            help=f.metadata.get("help", ""),
            secret=f.metadata.get("secret", False),
        )


def _nest(leaf: Leaf, value: Any, into: dict[str, Any], where: str) -> None:
    """Place a flag's or variable's text at the leaf's path; a mapping's text is parsed here, so
    that it merges key by key over the same mapping from YAML instead of replacing it."""
    if typing.get_origin(leaf.hint) is dict:
        value = _parse_mapping(value, where)
    path = leaf.path
    node = into
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) if value else "none"
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip() if value else "none"
    if value == "":
        return "none"
    return str(value)


def _metavar(field_name: str) -> str:
    """The unit or kind a value is given in, from the field name's last word (`grace_period_s`: SECONDS)."""
    word = field_name.rsplit("_", 1)[-1]
    return {"s": "SECONDS", "us": "MICROSECONDS", "mb": "MIB"}.get(word, word.upper())


def add_flags(
    parser: argparse.ArgumentParser, cls: type, title: str, helps: Mapping[str, str] | None = None
) -> None:
    """One flag per leaf of `cls` (secrets excepted). Flags default to None, so only those given on
    the command line override the other sources; `helps` replaces the help text of named flags."""
    group = parser.add_argument_group(title)
    seen: set[str] = set()
    for leaf in leaves(cls):
        if leaf.name in seen:
            raise ValueError(f"two settings of {cls.__name__} share the flag {leaf.option}")
        seen.add(leaf.name)
        if leaf.secret:
            continue
        text = f"{(helps or {}).get(leaf.name, leaf.help)} (default: {_shown(leaf.default)})".lstrip()
        text = text.replace("%", "%%")  # argparse formats help with %
        if leaf.hint is bool:
            group.add_argument(
                leaf.option, dest=leaf.name, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        else:
            origin = typing.get_origin(leaf.hint)
            metavar = "LIST" if origin is tuple else "MAPPING" if origin is dict else _metavar(leaf.path[-1])
            group.add_argument(leaf.option, dest=leaf.name, default=None, metavar=metavar, help=text)


def flag_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The flags given on the command line as nested data for `build`."""
    out: dict[str, Any] = {}
    for leaf in leaves(cls):
        value = getattr(args, leaf.name, None)
        if value is not None:
            _nest(leaf, value, out, leaf.option)
    return out


def env_values(
    env: Mapping[str, str], cls: type, prefix: str, ignore: tuple[str, ...] = ()
) -> dict[str, Any]:
    """`PREFIX<FLAG NAME>` variables (`HRNET_MAX_BATCH_SIZE=32`) as nested data for `build`.

    A variable with the prefix that names no setting is logged, not fatal: orchestrators add their
    own variables to a container's environment, and a typo should be visible, not crash a rollout.
    Variables starting with one of `ignore` belong to another component and are skipped silently.
    """
    by_variable = {leaf.variable(prefix): leaf for leaf in leaves(cls)}
    out: dict[str, Any] = {}
    for key, value in env.items():
        if not key.startswith(prefix) or key.startswith(ignore):
            continue
        leaf = by_variable.get(key)
        if leaf is None:
            close = difflib.get_close_matches(key, by_variable, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            log.warning("ignoring %s: not a setting of %s%s", key, cls.__name__, hint)
            continue
        _nest(leaf, value, out, key)
    return out
