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
