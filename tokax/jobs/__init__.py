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
