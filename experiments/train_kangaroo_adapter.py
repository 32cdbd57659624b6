"""Train Kangaroo's adapter for Gemma 3 270M on the target's own greedy text.

    python experiments/train_kangaroo_adapter.py        # ~11 minutes on 2 CPU cores
    python experiments/train_kangaroo_adapter.py --out /tmp/kangaroo --epochs 1

The self-draft is Gemma's first ``--layers`` layers (frozen), the adapter (one
Gemma attention block with its norms; its FFN kept at zero, as the paper's
adapter is attention only), its own final norm (initialised from Gemma's; it
also learns the logits' scale, which the confidence-based early stop reads)
and Gemma's tied LM head restricted to the
distilled draft's 16,384 frequent tokens (a full-vocabulary head costs about
half a target step per drafted token on a CPU; outside the subset q = 0, which
keeps verification exact).

Data: the shipped greedy corpus (``tokax.data.greedy.greedy_code_pairs``), 2,944
training-split function openings and the 64 tokens Gemma wrote after each. The
loss is the draft's cross-entropy against those tokens at the continuation
positions (``kangaroo.greedy_ce_loss``): greedy acceptance is exactly "the
draft's argmax is the target's greedy token", and the target's greedy token is
the data, so no target pass is needed. The adapter starts as the identity
(plain early exit). The last ``--heldout`` fraction of documents is held out;
the script reports held-out top-1 agreement with the target's greedy tokens and
the loss, before and after. Writes ``OUT/adapter.npz`` (the adapter in float16
and the head's token ids) and ``OUT/summary.json``;
``--config.kangaroo_adapter=trained`` uses the copy shipped in
``tokax/assets/gemma3_270m_kangaroo``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tokax.data.greedy import continuation_batch  # noqa: E402

CONT = 64


def evaluate(prop, params, pp, pairs, L: int, batch: int) -> dict:
    """Held-out top-1 agreement of the draft with the target's greedy tokens, and the mean
    cross-entropy, over every continuation position of ``pairs``."""
    from tokax.decode.proposers.kangaroo import greedy_scores

    @jax.jit
    def run(pp, toks, lengths, at, tgt):
        nll, in_head, agree = greedy_scores(prop, params, pp, toks, lengths, at, tgt)
        return agree.sum(-1), jnp.where(in_head, nll, 0.0).sum(-1), in_head.sum(-1)

    agree = nll = n_in = 0
    for s in range(0, len(pairs), batch):
        chunk = pairs[s:s + batch]
        n = len(chunk)
        a, l, k = run(pp, *(jnp.asarray(x) for x in continuation_batch(chunk + [chunk[-1]] * (batch - n), L)))
        agree += int(np.asarray(a)[:n].sum())
        nll += float(np.asarray(l)[:n].sum())
        n_in += int(np.asarray(k)[:n].sum())
    return {"positions": len(pairs) * CONT, "top1_agreement": round(agree / (len(pairs) * CONT), 4),
            "loss": round(nll / max(n_in, 1), 4), "targets_in_head": round(n_in / (len(pairs) * CONT), 4)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2, help="shallow target layers the draft shares")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16, help="documents per step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--heldout", type=float, default=0.1)
    ap.add_argument("--full_ffn", action="store_true", help="train the adapter's FFN too (not the paper's)")
    ap.add_argument("--shared_norm", action="store_true",
                    help="keep the target's final norm (default: the adapter trains its own copy)")
    ap.add_argument("--out", default=os.path.join(ROOT, "tokax", "assets", "gemma3_270m_kangaroo"))
    args = ap.parse_args(argv)

    from tqdm.auto import tqdm

    from tokax.decode import proposers as P
    from tokax.decode.proposers import kangaroo
    from tokax.decode.proposers.distilled import make_draft
    from tokax.model.loaders.gguf import load_gemma3
    from tokax.tokenize import load_gemma3_tokenizer
    from tokax.data.greedy import greedy_code_pairs

    t0 = time.perf_counter()
    cfg, params = load_gemma3("float32")
    head_ids = make_draft(cfg, params, "distilled")[1]["head_ids"]
    pairs = greedy_code_pairs(load_gemma3_tokenizer())
    n_held = int(round(len(pairs) * args.heldout))
    train, held = pairs[:-n_held], pairs[-n_held:]
    L = max(len(p) for p, _ in pairs) + CONT
    prop = P.KangarooProposer.make(cfg, args.layers)
    adapter = kangaroo.init_adapter(cfg, args.layers, jax.random.PRNGKey(0), identity=True)
    if not args.full_ffn:
        adapter = kangaroo.attention_only(adapter)
    pp = kangaroo.with_subset_head(params, adapter, head_ids,
                                   final_norm=None if args.shared_norm else params["final_norm"])
    before = evaluate(prop, params, pp, held, L, args.batch)
    print(json.dumps({"event": "before", **before}), flush=True)

    rng = np.random.default_rng(0)
    n_steps = args.epochs * (len(train) // args.batch)

    def batches():
        for _ in range(args.epochs):
            order = rng.permutation(len(train))
            for s in range(0, len(order) - args.batch + 1, args.batch):
                yield continuation_batch([train[i] for i in order[s:s + args.batch]], L)

    pp, losses = kangaroo.train_adapter_greedy(prop, params, pp, tqdm(batches(), total=n_steps, desc="adapter"),
                                               learning_rate=args.lr, attention_only=not args.full_ffn)
    after = evaluate(prop, params, pp, held, L, args.batch)
    res = {"layers": args.layers, "adapter": ("attention + FFN" if args.full_ffn else "attention only")
           + (", the target's final norm" if args.shared_norm else ", its own final norm"),
           "head": f"the distilled draft's {int(head_ids.shape[0])} tokens", "documents": len(pairs),
           "heldout_documents": n_held, "epochs": args.epochs, "steps": len(losses), "batch": args.batch,
           "lr": args.lr, "first_loss": round(losses[0], 4), "last_loss": round(float(np.mean(losses[-20:])), 4),
           "heldout_before": before, "heldout": after, "seconds": round(time.perf_counter() - t0, 1),
           "command": "python experiments/train_kangaroo_adapter.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(json.dumps(res), flush=True)
    out = {"adapter": jax.tree.map(lambda a: np.asarray(a, np.float16), pp["adapter"]),
           "head_ids": np.asarray(pp["head_ids"]), "n_shallow": np.int32(args.layers)}
    if "final_norm" in pp:
        out["final_norm"] = np.asarray(pp["final_norm"], np.float32)
    P.save_asset(args.out, "adapter.npz", out, res)
    return res


if __name__ == "__main__":
    main()
