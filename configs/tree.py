"""Token-tree speculative decoding with Gemma 3 270M as the target.

    python -m tokax.run --config configs/tree.py:dyspec --config.max_new_tokens=64 --config.json=True

Methods (``tokax.decode.proposers.tree_proposers``): draft_tree (a fixed
template, ``branching`` children per depth, filled from the draft), dyspec
(the tree grown by draft path probability under a ``n_nodes`` budget in
``rounds`` draft passes), token_recycling (no draft: an adjacency table of
the target's past top-``table_k``, read along the ``branching`` template),
spectr (``spectr_k`` i.i.d. draft chains of ``spectr_length`` tokens,
k-sequential selection). The draft is named by ``draft``: by default the
distilled draft shipped with tokax (configs/distill.py:draft). All are lossless.
"""

import ml_collections

METHODS = ("draft_tree", "dyspec", "token_recycling", "spectr")


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.job = "tree"
    c.model = "gemma3-270m"  # the target
    c.dtype = "float32"  # or bfloat16
    c.prompts_file = "configs/prompts/demo.json"  # JSON list of prompt strings
    c.max_new_tokens = 64
    c.temperature = 0.0  # 0 means greedy
    c.top_k = 0  # 0 disables
    c.top_p = 1.0  # 1 disables
    c.min_p = 0.0  # 0 disables
    c.seed = 0
    c.batch_size = 1  # prompts per compiled batch
    c.json = False  # one JSON object per prompt per line: prompt, token_ids, text, stats
    c.greedy_screen = True  # greedy verification through a bf16 screen of the unembedding (configs/speculative.py)

    c.method = arg or "draft_tree"  # one of METHODS
    # 'distilled': the draft shipped with tokax (configs/distill.py:draft: Gemma's first 4 layers + LoRA,
    # a 16k-token head); 'distilled:DIR': one exported by experiments/distill_gemma_draft.py;
    # 'truncated': the target's first draft_layers layers + final norm + full LM head (untrained baseline)
    c.draft = "distilled"
    c.draft_layers = 4
    c.branching = (3, 2, 1)  # draft_tree / token_recycling: children per node at each depth
    # dyspec
    c.n_nodes = 12  # node budget
    c.rounds = 4  # draft passes (= maximum depth)
    c.max_children = 4  # ranks considered per node
    # token_recycling
    c.table_k = 4  # adjacency table width (>= max(branching))
    # spectr
    c.spectr_k = 3  # i.i.d. draft chains
    c.spectr_length = 4  # tokens per chain
    return c
