"""Job: train blockwise / Medusa heads on a frozen target (``configs/blockwise.py``);
writes ``workdir/heads.npz`` (load with ``tokax.decode.proposers.load_params``; decode with
``configs/speculative.py --config.method=blockwise --config.blockwise.heads=...``),
``workdir/log.jsonl`` and ``workdir/summary.json`` (held-out accuracy per head). Progress
lines (JSON) go to stderr, the path of the saved heads to stdout."""

from __future__ import annotations

import json
import os

from tokax.jobs import check


def validate(c) -> None:
    from tokax.model.config import PRESETS

    check(isinstance(c.workdir, str) and c.workdir.strip(), "workdir", c.workdir, "give a directory")
    wd = os.path.expanduser(c.workdir)
    check(not os.path.exists(wd) or os.path.isdir(wd), "workdir", c.workdir, "is a file; give a directory")
    check(c.k >= 1, "k", c.k, "must be >= 1 (number of heads)")
    check(c.tokenizer in ("bytes", "gemma3"), "tokenizer", c.tokenizer, "use bytes or gemma3")
    check(c.target.init in ("random", "gemma3"), "target.init", c.target.init, "use random or gemma3")
    check(c.target.init != "gemma3" or c.tokenizer == "gemma3", "tokenizer", c.tokenizer,
          "target.init='gemma3' reads Gemma's own tokens: use tokenizer='gemma3'")
    check(c.target.preset in PRESETS, "target.preset", c.target.preset, f"use one of {', '.join(sorted(PRESETS))}")
    check(c.target.dtype in ("float32", "bfloat16"), "target.dtype", c.target.dtype, "use float32 or bfloat16")
    check(c.labels in ("greedy", "data"), "labels", c.labels, "use greedy (the target's own tokens) or data")
    for key in ("seq_len",):
        check(c[key] >= 2, key, c[key], "must be >= 2")
    for key in ("train_rows", "eval_rows", "target_batch", "steps", "batch_size", "log_every"):
        check(c[key] >= 1, key, c[key], "must be >= 1")
    for key in ("max_files", "cand_size", "head_vocab", "chunk_size"):
        check(c[key] >= 0, key, c[key], "must be >= 0 (0 disables)")
    check(c.lr > 0, "lr", c.lr, "must be > 0")
    check(c.weight_decay >= 0, "weight_decay", c.weight_decay, "must be >= 0")
    check(0 <= c.distill_weight <= 1, "distill_weight", c.distill_weight, "must be in [0, 1]")


def run(c) -> dict:
    from tokax.decode.proposers import save_params
    from tokax.train import heads

    validate(c)
    out = os.path.abspath(os.path.expanduser(str(c.workdir)))
    os.makedirs(out, exist_ok=True)
    if not c.hidden_cache:
        c.hidden_cache = os.path.join(out, "target_hidden.npz")  # a rerun reuses the target pass
    res = heads.run(c, log_file=os.path.join(out, "log.jsonl"))
    path = os.path.join(out, "heads.npz")
    save_params(path, res.pop("hparams"))
    res["heads"] = path
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(res, f, indent=1, default=float)
    print(f"heads saved to {path} (summary: {os.path.join(out, 'summary.json')})")
    return res
