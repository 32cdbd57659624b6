"""Helpers shared by tokax's tests, benchmarks and notebooks (no pytest import here).

``load_config(path, overrides)``: a config file's ``get_config(arg)`` with dotted-key
overrides applied, as ``--config.KEY=VALUE`` flags would (lists become tuples), and
``cli_overrides(overrides)``: the same overrides as ``--config.KEY=VALUE`` arguments.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

__all__ = ["load_config", "cli_overrides"]


def load_config(path: str, overrides: Mapping[str, Any] | None = None, arg: str | None = None):
    spec = importlib.util.spec_from_file_location("_tokax_test_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(arg)
    for key, val in (overrides or {}).items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = tuple(val) if isinstance(val, list) else val
    return c


def cli_overrides(overrides: Mapping[str, Any]) -> list[str]:
    return [f"--config.{k}={tuple(v) if isinstance(v, list) else v}" for k, v in overrides.items()]
