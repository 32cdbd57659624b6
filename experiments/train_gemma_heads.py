"""Train blockwise / Medusa heads on the frozen Gemma 3 270M (or the tiny default).

    python experiments/train_gemma_heads.py --out /tmp/heads_gemma --steps 600
    python experiments/train_gemma_heads.py --out /tmp/heads_tiny --config tiny --steps 300
    python experiments/train_gemma_heads.py --out /tmp/heads_gemma --decode_eval   # after training

``--decode_eval`` skips training and decodes held-out stdlib prompts with
Gemma greedily: plain, blockwise with OUT/heads.npz, blockwise with untrained
(copy-next) heads, and lookahead; it checks every output equals plain greedy
and writes mean accepted drafts per target pass to OUT/decode_eval.json.

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

from tokax.decode.proposers.blockwise import BlockwiseProposer, init_heads  # noqa: E402
from tokax.jobs import train_heads as train_heads_job  # noqa: E402


def load_config(arg: str):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "blockwise.py")
    spec = importlib.util.spec_from_file_location("_blockwise_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(None if arg == "tiny" else arg)


def decode_eval(out: str, n_prompts: int = 4, max_new: int = 48, k: int = 3) -> dict:
    import time

    from tokax.decode.generate import Generator
    from tokax.decode.proposers import load_params
    from tokax.decode.proposers.lookahead import LookaheadProposer
    from tokax.decode.speculative import SpeculativeGenerator
    from tokax.model.loaders.gguf import load_gemma3
    from tokax.tokenize import load_gemma3_tokenizer
    from tokax.data.stdlib import corpus_pieces

    cfg, params = load_gemma3("float32")
    tok = load_gemma3_tokenizer()
    # Held-out prompts: the first ~300 characters of eval-split pieces that start with a def.
    pieces = [p for p in corpus_pieces("eval") if p.startswith("def ")][:n_prompts]
    prompts = [p[:300] for p in pieces]
    t = time.time()
    ref = Generator(cfg, params, tok).generate(prompts, max_new)
    res = {"prompts": len(prompts), "max_new": max_new, "plain_s": round(time.time() - t, 1)}
    trained = load_params(os.path.join(out, "heads.npz"))
    for name, prop, pp in (
        ("blockwise_trained", BlockwiseProposer(k=k), trained),
        ("blockwise_untrained", BlockwiseProposer(k=k), init_heads(cfg.d_model, k)),
        ("lookahead", LookaheadProposer(k=4, ngram=3), None),
    ):
        t = time.time()
        outs, stats = SpeculativeGenerator(cfg, params, prop, pp, tok).generate(prompts, max_new)
        acc = sum(s["accepted"] for s in stats)
        passes = sum(s["target_passes"] for s in stats)
        res[name] = {"identical_to_greedy": outs == ref, "mean_accepted": round(acc / passes, 3),
                     "tokens_per_pass": round(sum(s["new_tokens"] for s in stats) / passes, 3),
                     "seconds_incl_compile": round(time.time() - t, 1)}
        print(name, res[name], flush=True)
    with open(os.path.join(out, "decode_eval.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--steps", type=int, default=None, help="head training steps (default: the config's)")
    ap.add_argument("--config", default="gemma", help="'gemma' (Gemma 3 270M) or 'tiny'")
    ap.add_argument("--k", type=int, default=None, help="number of heads")
    ap.add_argument("--train_rows", type=int, default=None, help="training sequences (one target pass each)")
    ap.add_argument("--cand_size", type=int, default=None, help="sampled-softmax candidates per batch")
    ap.add_argument("--head_vocab", type=int, default=None, help="heads over the N most frequent tokens")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (cosine decay)")
    ap.add_argument("--weight_decay", type=float, default=None, help="AdamW weight decay")
    ap.add_argument("--decode_eval", action="store_true", help="decode with OUT/heads.npz instead of training")
    args = ap.parse_args(argv)
    if args.decode_eval:
        return decode_eval(args.out)
    c = load_config(args.config)
    for key in ("steps", "k", "train_rows", "cand_size", "head_vocab", "lr", "weight_decay"):
        if getattr(args, key) is not None:
            setattr(c, key, getattr(args, key))
    c.workdir = args.out  # heads.npz, log.jsonl, summary.json; the target pass is cached there too
    return train_heads_job.run(c)


if __name__ == "__main__":
    main()
