"""Errors that cross package boundaries."""

from __future__ import annotations


class CommandError(Exception):
    """A failure caused by the user's input or environment: printed as one line, exit code 2."""

    exit_code = 2


class ConfigError(ValueError):
    """A setting is unknown or has a bad value; the message names the key and its source."""
