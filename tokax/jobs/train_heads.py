"""Job: train blockwise / Medusa heads on a frozen target (``configs/blockwise.py``);
writes ``workdir/heads.npz`` (load with ``tokax.decode.proposers.load_params``; decode with
``configs/speculative.py --config.method=blockwise --config.blockwise_heads=...``),
``workdir/log.jsonl`` and ``workdir/summary.json`` (held-out accuracy per head)."""

from __future__ import annotations

import json
import os

from tokax.jobs import check


def run(c) -> dict:
    from tokax.decode.proposers import save_params
    from tokax.train import heads

    check(c.k >= 1, "k", c.k, "must be >= 1 (number of heads)")
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
    print(f"heads saved to {path}")
    return res
