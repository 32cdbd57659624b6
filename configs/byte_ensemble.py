"""Byte-level ensemble of Gemma 3 270M with a small stdlib-trained model on another vocabulary.

Phan et al., "Exact Byte-Level Probabilities from Tokenized Language Models
for FIM-Tasks and Model Ensembles": two tokenized models with different
vocabularies become comparable once both are seen as next-byte
distributions (`tokax.decode.byte_level.ByteLM`), and can then be mixed
byte by byte (`ByteMixture`).

    python experiments/train_small_byte_model.py [--out ~/.cache/tokax/small_byte_model]
    python benchmarks/byte_level.py --n 40 --json

``get_config()`` is the small model's training config (the SFT trainer,
`tokax.train.trainer.run`): a 4096-piece byte-fallback BPE trained on the
stdlib's train split and a 4-layer decoder (600 steps of 12 x 384 tokens;
44 min on the shared 2-core CPU under load ~8, 1.1-1.7k tokens/s). ``get_config("ensemble")`` holds the ensemble settings the
benchmark reads.
"""

from __future__ import annotations

import os

import ml_collections

DEFAULT_DIR = os.path.expanduser("~/.cache/tokax/small_byte_model")


def train_config(out_dir: str = DEFAULT_DIR) -> ml_collections.ConfigDict:
    import importlib.util

    # configs/ is not a package: load the shared training keys from configs/sft.py by path.
    spec = importlib.util.spec_from_file_location("_sft_config", os.path.join(os.path.dirname(__file__), "sft.py"))
    sft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sft)
    c = sft.base_config()
    c.workdir = os.path.join(out_dir, "train")
    c.loss = "sft"
    c.loss_kwargs.z_loss = 1e-4
    c.seed = 0
    c.total_steps = 600
    c.model.overrides = ml_collections.ConfigDict(
        dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=512,
             sliding_window=128, max_seq_len=1024)
    )
    c.data.tokenizer = "spm"
    c.data.vocab_size = 4096
    c.data.tokenizer_dir = out_dir  # -> out_dir/stdlib_bpe_4096.model
    c.data.seq_len = 384
    c.data.batch_size = 12
    c.data.eval_batch_size = 12
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 50
    c.eval_every = 200
    c.eval_batches = 2
    c.checkpoint_every = 200
    c.keep_checkpoints = 1
    c.async_checkpoint = False
    c.tensorboard = False
    c.progress = False
    c.log_every = 25
    return c


def ensemble_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.small_dir = DEFAULT_DIR  # where experiments/train_small_byte_model.py wrote the small model
    c.rule = "fixed"  # "fixed": P(b|x) = sum_k w_k P_k(b|x), constant w; "bayes": posterior weights
    c.prior = (0.5, 0.5)  # (gemma, small): the fixed weights, or the prior of "bayes"
    c.tune_weights = True  # choose the (gemma, small) weights on dev_bytes of other held-out chunks
    c.dev_bytes = 512
    c.eval_bytes = 1024  # held-out stdlib bytes for bits/byte (~1 model call per byte per model)
    c.eval_chunk = 512  # each chunk is scored from its start (BOS), both models the same bytes
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg in (None, "", "train"):
        return train_config()
    if arg == "ensemble":
        return ensemble_config()
    raise ValueError(f"configs/byte_ensemble.py: unknown arg {arg!r}; use nothing, 'train' or 'ensemble'")
