"""Preference training (DPO family, KTO, BCO, ...) on a code-continuation task scored without humans.

    python -m tokax.run --config configs/preference.py --config.workdir=/tmp/dpo
    python -m tokax.run --config configs/preference.py --config.loss=ipo --config.loss_kwargs.beta=0.5
    python -m tokax.run --config configs/preference.py:gemma --config.workdir=/tmp/dpo_gemma

The task (``tokax.data.preference.build_code_preference_task``, also
``experiments/build_preference_task.py``): prompt = the first lines of a
stdlib function, chosen = its real next line, rejected = a line from another
function or the real line with its words shuffled. Train pairs come from the
corpus' train files, eval pairs from its held-out files; ``eval/rewards/accuracies``
is the held-out preference accuracy. Losses: dpo, cdpo, robust_dpo, ipo,
hinge, simpo, orpo, tdpo1, tdpo2, treg (paired) and kto, bco (unpaired: each pair gives one
labelled completion). Hyperparameters left at None keep the loss's default.

Default: the tiny decoder from random init (the reference is the same
random model, so DPO's implicit reward still has to learn the task); point
``model.init`` at an SFT run (``checkpoint:/tmp/tokax_sft``) for a realistic
start. ``:gemma``: real Gemma 3 270M + LoRA, reference = the base.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections
from ml_collections import config_dict

_spec = importlib.util.spec_from_file_location("_tokax_sft_config", os.path.join(os.path.dirname(__file__), "sft.py"))
_sft = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sft)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = _sft.base_config()
    c.workdir = "/tmp/tokax_preference"
    c.loss = "dpo"
    c.total_steps = 150
    c.loss_kwargs = ml_collections.ConfigDict(
        {
            "beta": config_dict.placeholder(float),
            "label_smoothing": config_dict.placeholder(float),
            "gamma": config_dict.placeholder(float),  # simpo
            "sft_weight": config_dict.placeholder(float),  # simpo
            "lam": config_dict.placeholder(float),  # orpo
            "alpha": config_dict.placeholder(float),  # tdpo2, treg
            "desirable_weight": config_dict.placeholder(float),  # kto
            "undesirable_weight": config_dict.placeholder(float),  # kto
        }
    )
    # T-REG's contrastive prompts: the reference scores each response token after these
    # instructions ("" = the trainer's defaults for the code task, DEFAULT_BETTER/WORSE_PREFIX).
    c.contrastive_prompts = ml_collections.ConfigDict({"better": "", "worse": ""})
    c.data.path = ""  # JSONL of {prompt, chosen, rejected} (or {prompt, completion, label}); "" = build the code task
    c.data.eval_path = ""
    c.data.n_examples = 2000
    c.data.n_eval_examples = 128
    c.data.context_lines = 4  # prompt = up to this many lines of the function before the target line
    c.data.seq_len = 128
    c.data.batch_size = 16
    c.data.eval_batch_size = 32
    c.data.bad_examples = "skip"
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 10
    c.eval_every = 50
    c.eval_batches = 2
    c.checkpoint_every = 50
    if arg == "gemma":
        _sft.gemma_overrides(c)
        c.workdir = "/tmp/tokax_preference_gemma"
        c.data.context_lines = 8
        c.data.seq_len = 192
        c.optimizer.lr = 5e-5
        c.total_steps = 100
        c.eval_every = 25
        c.checkpoint_every = 25
    elif arg not in (None, ""):
        raise ValueError(f"configs/preference.py: unknown arg {arg!r}; use nothing or 'gemma'")
    return c
