"""`make demo`: Gemma 3 270M on the bundled prompts, with tokens/s."""

from configs.generate import get_config as _generate


def get_config(arg=None):
    c = _generate(arg)
    c.job = "demo"
    c.batch_size = 1  # one prompt at a time, so the progress bar moves
    return c
