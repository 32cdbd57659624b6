"""Train blockwise-parallel / Medusa heads on a frozen target (``tokax.train.heads``).

    python -m tokax.run --config configs/blockwise.py --config.workdir=/tmp/heads_tiny
    python experiments/train_gemma_heads.py --out /tmp/heads_tiny --config tiny
    python experiments/train_gemma_heads.py --out /tmp/heads_gemma --steps 600   # configs/blockwise.py:gemma

Default: a random tiny target on byte-tokenized stdlib source, 3 heads, full
vocabulary, about a minute on 2 CPU cores. ``:gemma``: Gemma 3 270M (the
real weights), heads trained on its greedy tokens over 131k positions of
stdlib source, over the 16,384 most frequent tokens (``head_vocab``; the
262k-token vocabulary is too wide for a CPU step, and a sampled softmax
over it let the full-vocabulary argmax drift); the saved heads draft from
that subset too. The same heads serve ``blockwise`` (chain drafts) and
``medusa`` (``head_topk_tree`` for tree verification) decoding.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.job = "train_heads"
    c.workdir = "/tmp/tokax_heads"  # heads.npz, log.jsonl, summary.json (python -m tokax.run --config ...)
    c.k = 3  # heads: head i predicts the token i+1 after the target's next one
    c.tokenizer = "bytes"  # 'bytes' | 'gemma3' (tokax.train.data.get_tokenizer)
    c.target = ml_collections.ConfigDict()
    c.target.init = "random"  # 'random' | 'gemma3'
    c.target.preset = "tiny"
    c.target.dtype = "float32"
    c.target.seed = 1
    c.target.embed_init_std = 0.125
    c.target.overrides = ml_collections.ConfigDict(dict(vocab_size=256, d_model=64, head_dim=16, ffn_dim=128))
    c.seq_len = 64
    c.train_rows = 256  # sequences whose target hidden states are computed once
    c.eval_rows = 32
    c.max_files = 40  # stdlib files read (0 = all)
    c.target_batch = 32  # sequences per target pass
    c.labels = "greedy"  # 'greedy': the target's own argmax tokens; 'data': the corpus tokens
    c.distill_weight = 0.0  # w in (1-w) CE + w KL(target || head)
    c.cand_size = 0  # >0: sampled softmax over this many candidate ids per batch
    c.head_vocab = 0  # >0: heads over the N most frequent corpus tokens (training and decoding)
    c.chunk_size = 0  # >0: chunked log-softmax over the vocabulary
    c.steps = 300
    c.batch_size = 16
    c.lr = 3e-3
    c.weight_decay = 0.0
    c.seed = 0
    c.log_every = 50
    c.hidden_cache = ""  # .npz path: save / reuse the target pass (hidden states, greedy tokens)
    if arg == "gemma":
        c.tokenizer = "gemma3"
        c.target.init = "gemma3"
        c.target.preset = "gemma3-270m"
        c.target.overrides = ml_collections.ConfigDict()
        c.seq_len = 128
        c.train_rows = 192
        c.eval_rows = 12
        c.max_files = 0
        c.target_batch = 2
        c.cand_size = 0
        c.head_vocab = 16384  # full softmax over the 16k most frequent tokens (sampled softmax drifted)
        c.train_rows = 1024  # 131k target positions
        c.steps = 600
        c.batch_size = 4
        c.lr = 1e-3
        c.log_every = 25
    elif arg not in (None, ""):
        raise ValueError(f"configs/blockwise.py: unknown arg {arg!r}; use nothing or 'gemma'")
    return c
