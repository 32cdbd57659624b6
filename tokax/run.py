"""Command-line launcher: ``python -m tokax.run --config configs/X.py[:ARG] --config.key=value``.

The config's ``job`` key picks what runs:

- ``generate``     plain decoding of a prompts file (configs/generate.py)
- ``demo``         ``make demo``: plain decoding with tokens/s, then the speculative methods
                   on the same prompts (configs/demo.py)
- ``speculative``  speculative decoding, chain and token-tree methods (configs/speculative.py,
                   a block per method; ``configs/speculative.py:dyspec`` presets the method)
- ``byte_sample``  completion of prompts that may end inside a token (configs/byte_sample.py)
- ``train``        the training core: SFT, distillation, the preference losses
                   (configs/sft.py, distill.py, preference.py, byte_ensemble.py)
- ``train_heads``  blockwise / Medusa heads on a frozen target (configs/blockwise.py)

A bad input (an unknown key, a bad value, a missing or malformed file) ends
with one line, ``error: ...`` naming the key or file and the fix, and exit
status 2. Results go to stdout; status lines and progress bars to stderr
(bars only on a terminal unless ``--config.progress=True``). Library logs
(JAX, orbax, absl) and Python warnings are shown with ``--verbose``.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from tokax.errors import ConfigError, InputError

_CONFIG = config_flags.DEFINE_config_file("config", None, "path to a config file in configs/", lock_config=True)
_VERBOSE = flags.DEFINE_bool("verbose", False, "also show library logs (JAX, orbax, absl) and Python warnings")


def _lazy(module: str, fn: str = "run", **kw):
    """A job implemented in another module, imported only when it runs."""

    def job(c):
        import importlib

        return getattr(importlib.import_module(module), fn)(c, **kw)

    return job


JOBS = {
    "generate": _lazy("tokax.jobs.generate"),
    "demo": _lazy("tokax.jobs.generate", demo=True),
    "speculative": _lazy("tokax.jobs.speculative"),
    "byte_sample": _lazy("tokax.jobs.byte_sample"),
    "train": _lazy("tokax.jobs.train"),
    "train_heads": _lazy("tokax.jobs.train_heads"),
}


def _fail(e: Exception) -> None:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


def quiet_libraries(verbose: bool) -> None:
    """At default verbosity only tokax's own lines reach stderr: absl / Python logging of the
    libraries at ERROR, Python warnings off. ``--verbose`` (or absl's ``-v N``) shows them."""
    import logging
    import warnings

    from absl import logging as absl_logging

    tokax_log = logging.getLogger("tokax")
    if not tokax_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        tokax_log.addHandler(handler)
        tokax_log.propagate = False
    tokax_log.setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose or flags.FLAGS["verbosity"].present:
        if not flags.FLAGS["verbosity"].present:
            absl_logging.set_verbosity(absl_logging.INFO)
        return
    absl_logging.set_verbosity(absl_logging.ERROR)
    warnings.filterwarnings("ignore")


def main(argv):
    if len(argv) > 1:
        _fail(ConfigError(f"unexpected arguments: {argv[1:]}; use --config.key=value"))
    quiet_libraries(_VERBOSE.value)
    c = _CONFIG.value
    if c is None:
        _fail(ConfigError("pass --config configs/NAME.py"))
    job = c.get("job")
    if job not in JOBS:
        _fail(ConfigError(f"config job={job!r} is not one of {sorted(JOBS)}"))
    try:
        JOBS[job](c)
    except InputError as e:
        _fail(e)


def check_override_keys(argv: list[str]) -> None:
    """Fail with a readable message on ``--config.key`` overrides that the
    config file does not define (ml_collections would raise a bare
    AttributeError from inside flag parsing)."""
    import importlib.util

    path = None
    keys = []
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif a.startswith("--config."):
            keys.append(a[len("--config.") :].split("=", 1)[0])
    if path is None:
        return
    file, _, arg = path.partition(":")
    if not os.path.isfile(file):
        raise ConfigError(f"--config {file!r} does not exist" if not os.path.exists(file) else
                          f"--config {file!r} is not a file; give configs/NAME.py")
    spec = importlib.util.spec_from_file_location("_tokax_config", file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        cfg = mod.get_config(arg or None)
    except ValueError as e:  # a config file's own check of its ARG
        raise ConfigError(f"--config {path!r}: {e}") from e
    for key in keys:
        node = cfg
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(none)"
                raise ConfigError(f"unknown config key {key!r} for {file}; valid keys here: {valid}")
            node = node[part]
        if hasattr(node, "keys"):
            raise ConfigError(f"--config.{key} is a block of keys ({', '.join(sorted(node.keys()))}); "
                              f"set one of them, --config.{key}.KEY=VALUE")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag value as one ``error:`` line (absl prints two)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(ConfigError(str(e)))


def cli():
    # Config files import siblings as `configs.X`: run from the project root.
    sys.path.insert(0, os.getcwd())
    if "--verbose" not in sys.argv:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's C++ INFO/WARNING lines
    try:
        check_override_keys(sys.argv[1:])
        app.run(main, flags_parser=_parse_flags)
    except InputError as e:  # raised before main's handler
        _fail(e)


if __name__ == "__main__":
    cli()
