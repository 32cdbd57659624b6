"""The distilled draft model for Gemma 3 270M: save and load.

The draft is trained by ``configs/distill.py:draft`` (the training core,
forward KL from Gemma 3 270M): Gemma's first ``layers`` with LoRA adapters on
every projection, its final norm, and an output head over the
``head_vocab`` most frequent stdlib tokens (rows of Gemma's tied
embedding). Only what the target does not already ship is stored: the LoRA
factors (bfloat16) and the head's token ids, as one orbax checkpoint plus a
``meta.json``; the frozen base weights come from the target's GGUF at load
time. The trained draft ships with the package (``DEFAULT_DRAFT_DIR``, a few
MB); ``experiments/distill_gemma_draft.py`` retrains and re-exports it.

The draft's distribution is the LoRA-merged model's, conditioned on the head
subset (q = 0 outside it): any q keeps speculative sampling exact, and the
greedy verifier never depends on q.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tokax import ASSETS_DIR
from tokax.model.heads import subset_head_params
from tokax.model import lora as lora_lib
from tokax.model.config import ModelConfig
from tokax.model.decoder import Params

DEFAULT_DRAFT_DIR = ASSETS_DIR / "gemma3_270m_draft"
META = "meta.json"
ARRAYS = "arrays"  # the orbax checkpoint directory inside a draft directory


def save_distilled_draft(out_dir: str | os.PathLike, lora: Params, head_ids: np.ndarray, meta: dict,
                         dtype: Any = jnp.bfloat16) -> None:
    """Write ``lora`` (cast to ``dtype``) and ``head_ids`` as an orbax
    checkpoint under ``out_dir/arrays`` and ``meta`` (must name ``layers``,
    ``lora_alpha``, ``teacher``) as ``out_dir/meta.json``."""
    import orbax.checkpoint as ocp

    for key in ("layers", "lora_alpha", "teacher"):
        if key not in meta:
            raise ValueError(f"draft meta needs {key!r}; got keys {sorted(meta)}")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tree = {"lora": jax.tree.map(lambda x: jnp.asarray(x, dtype), lora),
            "head_ids": jnp.asarray(np.asarray(head_ids), jnp.int32)}
    ck = ocp.StandardCheckpointer()
    ck.save(out / ARRAYS, tree, force=True)
    ck.wait_until_finished()
    ck.close()
    (out / META).write_text(json.dumps(meta, indent=1) + "\n")


def load_distilled_draft(target_cfg: ModelConfig, target_params: Params,
                         path: str | os.PathLike | None = None) -> tuple[ModelConfig, dict]:
    """``(draft cfg, draft params)`` for ``DraftModelProposer`` /
    ``SpecDecPPProposer`` / the tree proposers, from a draft directory
    (default: the one shipped with tokax) and the target's own weights."""
    import orbax.checkpoint as ocp

    d = Path(path or DEFAULT_DRAFT_DIR).resolve()
    if not (d / META).exists() or not (d / ARRAYS).exists():
        raise FileNotFoundError(
            f"no distilled draft at {d} (expected {META} and {ARRAYS}/); train one with "
            "`python experiments/distill_gemma_draft.py --out DIR`"
        )
    meta = json.loads((d / META).read_text())
    if meta["teacher"] != target_cfg.name:
        raise ValueError(f"the draft at {d} was distilled from {meta['teacher']!r}, the target is {target_cfg.name!r}")
    layers = [int(i) for i in meta["layers"]]
    if max(layers) >= target_cfg.n_layers:
        raise ValueError(f"draft layers {layers} exceed the target's {target_cfg.n_layers} layers")
    cfg = target_cfg.replace(n_layers=len(layers), name=f"{target_cfg.name}-draft{len(layers)}")
    base = {"embed": target_params["embed"], "final_norm": target_params["final_norm"],
            **{f"layer_{i}": target_params[f"layer_{j}"] for i, j in enumerate(layers)}}
    ck = ocp.StandardCheckpointer()
    try:
        with warnings.catch_warnings():  # single-host arrays: no sharding to restore onto
            warnings.filterwarnings("ignore", message="Sharding info not provided")
            tree = ck.restore(d / ARRAYS)
    finally:
        ck.close()
    lora = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree["lora"])
    decoder = lora_lib.lora_merge(base, lora, float(meta["lora_alpha"]))
    return cfg, subset_head_params(decoder, np.asarray(tree["head_ids"]))


def draft_meta(path: str | os.PathLike | None = None) -> dict:
    """The ``meta.json`` of a draft directory (training statistics included)."""
    return json.loads((Path(path or DEFAULT_DRAFT_DIR) / META).read_text())


def make_draft(target_cfg: ModelConfig, target_params: Params, draft: str = "distilled",
               draft_layers: int = 4) -> tuple[ModelConfig, Any]:
    """The draft named by ``draft``: ``'distilled'`` (the shipped distilled
    draft), ``'distilled:DIR'`` (one exported elsewhere) or ``'truncated'``
    (the target's first ``draft_layers`` layers + final norm + full LM head,
    untrained: a baseline)."""
    from tokax.decode.proposers.draft_model import truncated_draft

    if draft == "truncated":
        if not 1 <= draft_layers < target_cfg.n_layers:
            raise ValueError(f"draft_layers={draft_layers} must be in [1, {target_cfg.n_layers - 1}]")
        return truncated_draft(target_cfg, target_params, draft_layers)
    if draft == "distilled" or draft.startswith("distilled:"):
        return load_distilled_draft(target_cfg, target_params, draft.partition(":")[2] or None)
    raise ValueError(f"draft={draft!r}: use 'distilled', 'distilled:DIR' or 'truncated'")
