"""Train blockwise / Medusa heads on the frozen Gemma 3 270M (or the tiny default).

    python experiments/train_gemma_heads.py --out /tmp/heads_gemma --steps 600
    python experiments/train_gemma_heads.py --out /tmp/heads_tiny --config tiny --steps 300

Writes ``OUT/heads.npz`` (``tokax.decode.proposers.save_params``; load with
``load_params`` and pass as ``pparams`` to ``BlockwiseProposer``),
``OUT/log.jsonl`` (progress) and ``OUT/summary.json`` (per-head held-out top-1
accuracy vs the target's greedy token, before and after training).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokax.decode.proposers import save_params  # noqa: E402
from tokax.decode.proposers.blockwise import apply_heads, init_heads  # noqa: E402
from tokax.train import heads  # noqa: E402


def load_config(arg: str):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "blockwise.py")
    spec = importlib.util.spec_from_file_location("_blockwise_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(None if arg == "tiny" else arg)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--steps", type=int, default=None, help="head training steps (default: the config's)")
    ap.add_argument("--config", default="gemma", help="'gemma' (Gemma 3 270M) or 'tiny'")
    ap.add_argument("--k", type=int, default=None, help="number of heads")
    ap.add_argument("--train_rows", type=int, default=None, help="training sequences (one target pass each)")
    args = ap.parse_args(argv)
    c = load_config(args.config)
    for key in ("steps", "k", "train_rows"):
        if getattr(args, key) is not None:
            setattr(c, key, getattr(args, key))
    os.makedirs(args.out, exist_ok=True)
    res = heads.run(c, apply_heads, lambda d, k, rng: init_heads(d, k), log_file=os.path.join(args.out, "log.jsonl"))
    path = os.path.join(args.out, "heads.npz")
    save_params(path, res.pop("hparams"))
    res["heads"] = path
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
