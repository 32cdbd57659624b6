"""Train the SpecDec++ acceptance head on the distilled Gemma draft.

    python experiments/train_specdec_head.py                 # ~150 steps, a few minutes on 2 CPU cores
    python experiments/train_specdec_head.py --steps 300 --out /tmp/specdec_head.npz

The draft is the one ``configs/speculative.py`` uses (``--draft``, default the
shipped distilled draft); the target is Gemma 3 270M. Training text is the
stdlib corpus's train split, teacher-forced; the labels are greedy
acceptance, ``[argmax p == x]``, averaged over the positions where ``x`` is
the draft's own greedy token (what a greedy draft proposes:
``head_loss(draft_tokens_only=True)``). Reported on held-out (eval split)
text: the BCE of the trained head, of the best constant predictor, and the
accuracy of thresholding at 1/2. Writes the head as ``.npz``
(``tokax.decode.proposers.save_params``; use it with
``--config.specdec_head=PATH``). Measured so far (150 steps): the trained
head does not beat a constant predictor on held-out text, so no head ships.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

DEFAULT_OUT = "/tmp/tokax_specdec_head.npz"


def heldout_metrics(prop, cfg, params, pparams, tokens) -> dict:
    from tokax.decode.proposers.draft_model import draft_forward
    from tokax.decode.proposers.specdec_pp import acceptance_prob
    from tokax.model.decoder import forward

    @jax.jit
    def run(x):
        pos = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32)[None], x.shape)
        p_lg, _, _ = forward(cfg, params, x, pos)
        q_lg, q_h, _ = draft_forward(prop.cfg, pparams["model"], x, pos)
        return jnp.argmax(p_lg, -1), jnp.argmax(q_lg, -1), acceptance_prob(pparams["head"], q_h)

    ys, ws, ps = [], [], []
    for s in range(0, len(tokens), 4):
        x = tokens[s : s + 4]
        pg, qg, a = (np.asarray(v) for v in run(jnp.asarray(x)))
        ys.append((pg[:, :-1] == x[:, 1:]).ravel())
        ws.append((qg[:, :-1] == x[:, 1:]).ravel())
        ps.append(a[:, 1:].ravel())
    y, w, a = (np.concatenate(v) for v in (ys, ws, ps))
    y, a = y[w].astype(np.float64), np.clip(a[w].astype(np.float64), 1e-7, 1 - 1e-7)
    m = y.mean()
    return {"positions": int(w.sum()), "accept_rate": round(float(m), 4),
            "bce_head": round(float(-(y * np.log(a) + (1 - y) * np.log(1 - a)).mean()), 4),
            "bce_best_constant": round(float(-(y * np.log(m) + (1 - y) * np.log(1 - m)).mean()), 4),
            "accuracy_at_half": round(float(((a > 0.5) == (y > 0.5)).mean()), 4)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draft", default="distilled")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rows", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    from tqdm.auto import tqdm

    from tokax.decode import proposers as P
    from tokax.decode.proposers import specdec_pp
    from tokax.decode.proposers.distilled import make_draft
    from tokax.decode.sampling import SamplingParams
    from tokax.model.loaders.gguf import load_gemma3
    from tokax.tokenize import load_gemma3_tokenizer
    from tokax.train.data import corpus_pieces
    from tokax.train.heads import token_rows

    cfg, params = load_gemma3("float32")
    tok = load_gemma3_tokenizer()
    dcfg, dparams = make_draft(cfg, params, args.draft)
    prop = P.SpecDecPPProposer(cfg=dcfg, k=5)
    pparams = {"model": dparams, "head": specdec_pp.init_head(dcfg.d_model, jax.random.PRNGKey(0))}
    train = token_rows(tok, corpus_pieces("train"), args.steps * args.rows, args.seq_len)
    held = token_rows(tok, corpus_pieces("eval"), 16, args.seq_len)
    sp = SamplingParams.make(0.0)
    before = heldout_metrics(prop, cfg, params, pparams, held)
    print(json.dumps({"event": "before", **before}), flush=True)
    batches = (train[i * args.rows : (i + 1) * args.rows] for i in range(args.steps))
    pparams, losses = specdec_pp.train_head(prop, cfg, params, pparams,
                                            tqdm(batches, total=args.steps, desc="specdec head"), sp,
                                            learning_rate=args.lr, draft_tokens_only=True)
    after = heldout_metrics(prop, cfg, params, pparams, held)
    res = {"event": "done", "steps": len(losses), "first_loss": round(losses[0], 4),
           "last_loss": round(float(np.mean(losses[-10:])), 4), "heldout_before": before, "heldout": after}
    print(json.dumps(res), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    P.save_params(args.out, pparams["head"])
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
