"""Supervised fine-tuning (next-token NLL) on the Python standard library's source.

    python -m tokax.run --config configs/sft.py --config.workdir=/tmp/sft
    python -m tokax.run --config configs/sft.py:gemma --config.workdir=/tmp/sft_gemma

Default: a tiny random decoder (2 layers, d_model 64) with a 1024-piece BPE
trained on the stdlib (cached in the workdir); finishes in a couple of
minutes on 2 CPU cores. ``:gemma``: the real Gemma 3 270M with LoRA on the
attention projections and Gemma's tokenizer.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from tokax.train.sharding import DEFAULT_RULES


def base_config() -> ml_collections.ConfigDict:
    """Keys shared by every training config (sft, distill, preference)."""
    c = ml_collections.ConfigDict()
    c.job = "train"
    c.workdir = "/tmp/tokax_train"
    c.seed = 0
    c.total_steps = 300
    c.loss = "sft"
    c.loss_kwargs = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"  # 'tiny' | 'gemma3-270m' (see tokax.model.config.PRESETS)
    c.model.init = "random"  # 'random' | 'gemma3' (real weights) | 'checkpoint:DIR'
    c.model.dtype = "float32"
    c.model.embed_init_std = 0.125  # random init only: tied embedding std (0 = the decoder's 1.0)
    c.model.overrides = ml_collections.ConfigDict(
        dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=256, sliding_window=64)
    )

    c.lora = ml_collections.ConfigDict()
    c.lora.enabled = False
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.targets = ("q", "k", "v", "o")

    c.data = ml_collections.ConfigDict()
    c.data.tokenizer = "spm"  # 'spm' (stdlib BPE) | 'bytes' | 'gemma3'
    c.data.vocab_size = 1024  # for 'spm'
    c.data.tokenizer_dir = ""  # where the 'spm' model is cached; "" = the workdir
    c.data.seq_len = 128
    c.data.batch_size = 16  # sequences per optimizer step (all micro-batches)
    c.data.grad_accum = 1  # micro-batches per step
    c.data.eval_batch_size = 16
    c.data.piece_chars = 2000
    c.data.max_files = 0  # 0 = the whole corpus split
    c.data.bad_examples = "error"  # 'error' | 'skip' (logged)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.lr = 3e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 20
    c.optimizer.final_lr_ratio = 0.1
    c.optimizer.weight_decay = 0.01
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.98
    c.optimizer.grad_clip = 1.0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # all devices not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.sequence = 1
    c.mesh.rules = DEFAULT_RULES

    c.logprob_chunk = 0  # vocabulary chunk for the log-prob kernels; 0 = full softmax (small V)
    c.logprobs_impl = "auto"  # or "chunked_kernel": the Pallas log-prob kernel (interpret mode on CPU)
    c.log_ref_kl = True
    c.nonfinite = "skip"  # 'skip' (logged, params unchanged) | 'error'
    c.max_consecutive_nonfinite = 10
    c.log_every = 1
    c.eval_every = 100
    c.eval_batches = 2
    c.checkpoint_every = 100
    c.keep_checkpoints = 2
    c.async_checkpoint = True
    c.tensorboard = True
    c.progress = config_dict.placeholder(bool)  # None: a progress bar on stderr when it is a terminal
    # A rerun into a workdir resumes it only under the same config (workdir/config.json); True
    # continues after a change anyway (the differences are printed, the old config kept).
    c.allow_config_change = False
    return c


def gemma_overrides(c: ml_collections.ConfigDict) -> None:
    """Switch a config to the real Gemma 3 270M with LoRA (shared by the three configs)."""
    c.model.preset = "gemma3-270m"
    c.model.init = "gemma3"
    c.model.overrides = ml_collections.ConfigDict()
    c.model.embed_init_std = 0.0
    c.lora.enabled = True
    c.data.tokenizer = "gemma3"
    c.data.seq_len = 256
    c.data.batch_size = 8
    c.data.eval_batch_size = 8
    c.optimizer.lr = 2e-4
    c.optimizer.warmup_steps = 10
    c.optimizer.weight_decay = 0.0
    c.logprob_chunk = 16384  # 262k vocabulary: never materialise [B, T, V] logits
    c.total_steps = 200
    c.eval_every = 50
    c.checkpoint_every = 50


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config()
    c.workdir = "/tmp/tokax_sft"
    c.loss = "sft"
    c.loss_kwargs.z_loss = 1e-4
    if arg == "gemma":
        gemma_overrides(c)
        c.workdir = "/tmp/tokax_sft_gemma"
    elif arg not in (None, ""):
        raise ValueError(f"configs/sft.py: unknown arg {arg!r}; use nothing or 'gemma'")
    return c
