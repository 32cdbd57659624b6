"""Errors that mean "the user's input is wrong", as opposed to a bug in tokax.

The launcher (``tokax.run``) prints an ``InputError`` as one line, ``error:
<message>``, and exits with status 2; any other exception keeps its
traceback, since it is a bug to report. So every message here must name
what is wrong (the config key, the file and line, the prompt) and the fix.
A leaf module: it imports nothing from tokax.
"""

from __future__ import annotations

from typing import Any

__all__ = ["InputError", "ConfigError", "check"]


class InputError(ValueError):
    """A bad input (a config value, a data file, a prompt); the message names it and the fix."""


class ConfigError(InputError):
    """A config value a job cannot use; the message names ``--config.KEY``."""


def check(cond: Any, key: str, value: Any, fix: str) -> None:
    """Raise ``ConfigError("--config.KEY=VALUE is invalid: FIX")`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"--config.{key}={value!r} is invalid: {fix}")


class ContextTooLong(InputError):
    """A prompt plus the tokens asked for does not fit the model's context (``max_seq_len``)."""
