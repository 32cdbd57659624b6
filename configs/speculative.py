"""Speculative decoding with Gemma 3 270M as the target: one config, a block per method.

    python -m tokax.run --config configs/speculative.py --config.method=prompt_lookup \
        --config.prompts_file=prompts.json --config.max_new_tokens=64 --config.json=True
    python -m tokax.run --config configs/speculative.py:dyspec --config.dyspec.n_nodes=16
    python -m tokax.run --config configs/speculative.py:tree --config.draft_model.name=truncated

``get_config("METHOD")`` presets ``method``. Each method's hyperparameters live in its own
block, ``--config.METHOD.KEY`` (the defaults and what each method is come from the registry,
``tokax.decode.methods``; ``python -c "from tokax.decode import methods; print(*(f'{n}: {m.doc}'
for n, m in methods.METHODS.items()), sep='\\n')"`` lists them). Chain methods: draft,
prompt_lookup, retrieval, anpd, kangaroo, specdec_pp, lookahead, blockwise; token trees
verified in one target pass: tree, dyspec, spectr, token_recycling, medusa, retrieval_tree.
All are lossless. Shared by the methods that run a draft model (draft, specdec_pp, tree,
dyspec, spectr): ``draft_model.name`` ('distilled': the draft shipped with tokax,
configs/distill.py:draft; 'distilled:DIR': one exported by experiments/distill_gemma_draft.py;
'truncated': the target's first ``draft_model.layers`` layers, an untrained baseline).
"""

import ml_collections
from ml_collections import config_dict

from tokax.decode import methods

METHODS = methods.method_names()


def get_config(arg=None):
    if arg not in (None, "") and arg not in METHODS:
        raise ValueError(f"configs/speculative.py: unknown arg {arg!r}; use one of {', '.join(METHODS)}")
    c = ml_collections.ConfigDict()
    c.job = "speculative"
    c.model = "gemma3-270m"  # the target
    c.dtype = "float32"  # or bfloat16
    c.prompts_file = "configs/prompts/demo.json"  # JSON list of prompt strings
    c.max_new_tokens = 64
    c.temperature = 0.0  # 0 means greedy
    c.top_k = 0  # 0 disables
    c.top_p = 1.0  # 1 disables
    c.min_p = 0.0  # 0 disables
    c.seed = 0
    c.batch_size = 1  # prompts per compiled batch (speculation pays most at batch 1)
    c.json = False  # one JSON object per prompt per line: prompt, token_ids, text, stats
    c.progress = config_dict.placeholder(bool)  # None: a progress bar on stderr when it is a terminal
    # Greedy rounds verify through a bfloat16 screen of the unembedding with certified error
    # bounds (tokax.model.screen): the same tokens as the float32 argmax, about half the cost of
    # a multi-position unembedding on CPU; 335 MB more memory; float32 only (ignored for bfloat16).
    c.greedy_screen = True
    # Verify-pass lengths a round picks from (the smallest that holds its drafts): 'pow2' (1, 2, 4, ..
    # and k+1), 'every' (1 .. k+1, one compiled pass each; no faster on 2 CPU cores) or 'full'
    # (always k+1). Token trees use them only where the proposer puts valid nodes first (retrieval_tree).
    c.verify_sizes = "pow2"

    c.method = arg or "prompt_lookup"  # one of METHODS
    c.draft_model = methods.draft_model_block()
    for name in METHODS:  # one block per method, with its defaults
        c[name] = methods.default_block(name)
    return c
