"""Knowledge distillation: per-token forward KL(teacher || student) on the stdlib corpus.

    python -m tokax.run --config configs/distill.py --config.workdir=/tmp/distill
    python -m tokax.run --config configs/distill.py --config.teacher.init=checkpoint:/tmp/tokax_sft
    python -m tokax.run --config configs/distill.py:gemma --config.workdir=/tmp/distill_gemma
    python -m tokax.run --config configs/distill.py:draft     # the draft model of configs/speculative.py

Default: a tiny student (1 layer) learns from a tiny teacher (2 layers).
The teacher is random unless ``teacher.init`` names a trained run
(``checkpoint:DIR`` of configs/sft.py, same tokenizer and model shape as
``teacher.overrides``). ``:gemma``: teacher = the real Gemma 3 270M; the
student starts as every other of its 18 layers (layer dropping) and trains
LoRA adapters on all projections. ``:draft``: the speculative-decoding draft,
Gemma's first 4 layers + LoRA with a head over the 16k most frequent tokens
(``head_vocab``); ``experiments/distill_gemma_draft.py`` runs it and exports
the small checkpoint that ``configs/speculative.py`` loads.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

_spec = importlib.util.spec_from_file_location("_tokax_sft_config", os.path.join(os.path.dirname(__file__), "sft.py"))
_sft = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sft)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = _sft.base_config()
    c.workdir = "/tmp/tokax_distill"
    c.loss = "distill"
    c.total_steps = 200
    c.loss_kwargs.sft_weight = 0.0
    c.model.overrides.n_layers = 1
    c.model.from_teacher_layers = ()  # non-empty: the student is these teacher layers
    c.head_vocab = 0  # > 0: the student's head covers only the N most frequent corpus tokens (a draft head)

    c.teacher = ml_collections.ConfigDict()
    c.teacher.preset = "tiny"
    c.teacher.init = "random"  # 'random' | 'gemma3' | 'checkpoint:DIR'
    c.teacher.dtype = "float32"
    c.teacher.seed = 1
    c.teacher.embed_init_std = 0.125
    c.teacher.overrides = ml_collections.ConfigDict(
        dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=256, sliding_window=64)
    )
    if arg in ("gemma", "draft"):  # teacher = Gemma 3 270M, student = some of its layers + LoRA everywhere
        _sft.gemma_overrides(c)
        c.teacher.preset = "gemma3-270m"
        c.teacher.init = "gemma3"
        c.teacher.overrides = ml_collections.ConfigDict()
        c.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")
    if arg == "gemma":
        c.workdir = "/tmp/tokax_distill_gemma"
        c.model.from_teacher_layers = tuple(range(0, 18, 2))
        c.lora.rank = 16
        c.optimizer.lr = 5e-4
    elif arg == "draft":
        # The speculative-decoding draft for Gemma 3 270M (method `draft` in configs/speculative.py):
        # its first 4 layers with LoRA on every projection, and a head over the 16,384 most frequent
        # stdlib tokens (about 1/16 of the unembedding's cost). The KL is taken conditional on that
        # subset, the only tokens the draft can propose.
        c.workdir = "/tmp/tokax_draft_gemma"
        c.model.from_teacher_layers = (0, 1, 2, 3)
        c.head_vocab = 16384
        c.lora.rank = 32
        c.lora.alpha = 32.0
        c.optimizer.lr = 1e-3
        c.optimizer.warmup_steps = 10
        c.total_steps = 400  # 800k tokens; about 30 min on 2 CPU cores
        c.eval_every = 50
        c.checkpoint_every = 25
    elif arg not in (None, ""):
        raise ValueError(f"configs/distill.py: unknown arg {arg!r}; use nothing, 'gemma' or 'draft'")
    return c
