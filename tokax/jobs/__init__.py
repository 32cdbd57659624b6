"""Job functions: ``run(config) -> list[dict]`` per experiment family.

A job reads a ``ml_collections.ConfigDict`` (see ``configs/``); the command
line lives in ``tokax.run`` only. Bad config values raise ``ConfigError``
with a message naming the key and the fix.
"""


class ConfigError(ValueError):
    """A config value a job cannot use; the message names ``--config.KEY``."""


def check(cond: bool, key: str, value, fix: str) -> None:
    if not cond:
        raise ConfigError(f"--config.{key}={value!r} is invalid: {fix}")


def load_prompts(path: str) -> list[str]:
    """The prompts of ``--config.prompts_file``: a non-empty JSON list of strings."""
    import json
    import os

    if not os.path.exists(path):
        raise ConfigError(f"--config.prompts_file={path!r} does not exist")
    try:
        with open(path) as f:
            prompts = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config.prompts_file={path!r} is not valid JSON: {e}") from e
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError(f"--config.prompts_file={path!r} must hold a non-empty JSON list of strings")
    return prompts


def check_decoding(c) -> None:
    """The keys every Gemma decoding job shares (configs/generate.py, speculative.py, tree.py)."""
    check(c.model == "gemma3-270m", "model", c.model, "only 'gemma3-270m' is available")
    check(c.dtype in ("float32", "bfloat16"), "dtype", c.dtype, "use float32 or bfloat16")
    check(c.max_new_tokens >= 1, "max_new_tokens", c.max_new_tokens, "must be >= 1")
    check(c.temperature >= 0, "temperature", c.temperature, "must be >= 0 (0 means greedy)")
    check(c.top_k >= 0, "top_k", c.top_k, "must be >= 0 (0 disables)")
    check(0 < c.top_p <= 1, "top_p", c.top_p, "must be in (0, 1] (1 disables)")
    check(0 <= c.min_p <= 1, "min_p", c.min_p, "must be in [0, 1] (0 disables)")
    check(c.batch_size >= 1, "batch_size", c.batch_size, "must be >= 1")
