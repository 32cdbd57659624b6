"""Speculative decoding with Gemma 3 270M as the target.

    python -m tokax.run --config configs/speculative.py --config.method=prompt_lookup \
        --config.prompts_file=prompts.json --config.max_new_tokens=64 --config.json=True

``get_config("METHOD")`` presets the method (``configs/speculative.py:anpd``).
Methods: draft (the draft model named by ``draft``: by default the distilled
draft shipped with tokax, see configs/distill.py:draft), prompt_lookup,
retrieval (prompt lookup, else an n-gram datastore of the standard library and of
Gemma's own greedy continuations of it),
retrieval_tree (the same sources, and the datastore's runner-up, merged into one
token tree), anpd,
kangaroo (first ``kangaroo_layers`` layers + adapter + LM head), specdec_pp
(the draft model + an acceptance head), lookahead (n-gram pool of the target's
own guesses), blockwise (k heads on the target's hidden state; train them with
experiments/train_gemma_heads.py); token trees verified in one target pass:
tree (a fixed template from the draft's top-k), dyspec (a tree grown by
draft path probability under a node budget), spectr (k i.i.d. draft chains),
token_recycling (an adjacency table of the target's past top-k), medusa (the
blockwise heads' top-k tree). All are lossless.
"""

import ml_collections
from ml_collections import config_dict

METHODS = ("draft", "prompt_lookup", "retrieval", "anpd", "kangaroo", "specdec_pp", "lookahead", "blockwise",
           "tree", "dyspec", "spectr", "token_recycling", "medusa", "retrieval_tree")


def get_config(arg=None):
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
    # and k+1), 'every' (1 .. k+1, one compiled pass each; no faster on 2 CPU cores, session 7) or
    # 'full' (always k+1). Token trees use them only where the proposer puts valid nodes first
    # (retrieval_tree).
    c.verify_sizes = "pow2"

    c.method = arg or "prompt_lookup"  # one of METHODS
    c.k = 5  # maximum draft tokens per round
    # prompt_lookup / retrieval / anpd
    c.max_ngram = 3
    c.min_ngram = 1
    c.init_ngram = 2  # anpd: starting n-gram size (adapted online)
    # retrieval: prompt lookup, and where the context has no match a draft from an n-gram
    # datastore of a corpus (tokax.decode.proposers.retrieval): 'stdlib' = the standard library's
    # training split; 'greedy' = Gemma 3 270M's own greedy continuations of training-split code
    # (shipped; experiments/build_greedy_corpus.py); 'stdlib+greedy' = both; or a directory of
    # .py/.txt/.md files
    c.retrieval_corpus = "stdlib+greedy"
    c.retrieval_greedy_weight = 3  # 'stdlib+greedy': times each greedy continuation is counted
    c.retrieval_ngram = 3  # longest stored context
    c.retrieval_min_count = 3  # a context is stored when its top continuation was seen this often
    c.retrieval_min_conf = 0.15  # drafting stops at a continuation with a smaller share
    # retrieval_tree: node slots per candidate (prompt lookup, datastore chain, datastore runner-up
    # + chain), each below the prefix it shares with the earlier ones; the first is the draft length
    c.retrieval_branches = (5, 1, 1)
    c.retrieval_alt_min_conf = 0.1  # the runner-up is drafted when its share is at least this
    # draft / specdec_pp: the draft model
    # 'distilled': the draft shipped with tokax (configs/distill.py:draft: Gemma's first 4 layers + LoRA,
    # a 16k-token head); 'distilled:DIR': one exported by experiments/distill_gemma_draft.py;
    # 'truncated': the target's first draft_layers layers + final norm + full LM head (untrained baseline)
    c.draft = "distilled"
    c.draft_layers = 4
    # kangaroo
    c.kangaroo_layers = 2  # shallow layers shared with the target
    c.kangaroo_threshold = 0.6  # stop drafting after a token with top-1 prob below this
    # 'trained': the adapter shipped with tokax (experiments/train_kangaroo_adapter.py: one attention
    # block after the first 2 layers, a 16k-token head); a .npz path; "" = identity adapter (early exit)
    c.kangaroo_adapter = "trained"
    # specdec_pp
    c.specdec_threshold = 0.5  # stop when predicted P(some rejection) exceeds this (docs/benchmarks.md, session 8)
    # 'trained': the head shipped with tokax for the distilled draft (experiments/train_specdec_head.py);
    # a .npz path; "" = untrained head predicting specdec_prior everywhere (a fixed draft length)
    c.specdec_head = "trained"
    c.specdec_prior = 0.8
    # lookahead (training-free n-gram pool from the target's own Jacobi guesses)
    c.lookahead_ngram = 3
    c.lookahead_buckets = 1024
    c.lookahead_slots = 4
    # blockwise (Stern et al. 2018) / Medusa-style heads on the frozen target
    # 'trained': the Gemma heads shipped with tokax (experiments/train_gemma_heads.py, 16k-token subset);
    # a .npz path; "" = untrained heads (copy next)
    c.blockwise_heads = "trained"
    c.blockwise_sample_drafts = True
    # token trees (verified in one target pass; tokax.decode.tree_speculative)
    c.branching = (3, 2, 1)  # tree (a fixed template filled from the draft) / token_recycling: children per depth
    c.n_nodes = 12  # dyspec: node budget
    c.rounds = 4  # dyspec: draft passes (= maximum depth)
    c.max_children = 4  # dyspec: ranks considered per node
    c.table_k = 4  # token_recycling: adjacency table width (>= max(branching))
    c.spectr_k = 3  # spectr: i.i.d. draft chains
    c.spectr_length = 4  # spectr: tokens per chain
    c.medusa_topk = (3, 2, 1)  # medusa: top-k of each blockwise head (tree = their cartesian product)
    return c
