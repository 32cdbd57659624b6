"""Train the SpecDec++ acceptance head of the distilled Gemma draft on the target's own greedy text.

    python experiments/train_specdec_head.py      # ~11 minutes on 2 CPU cores (the draft's passes)
    python experiments/train_specdec_head.py --out /tmp/head --steps 3000

Data: the shipped greedy corpus (``tokax.data.greedy.greedy_code_pairs``): 2,944
stdlib training-split function openings and the 64 tokens Gemma 3 270M wrote
after each, greedily. At every continuation position the accepted prefix is
exactly what greedy speculative decoding would have accepted, so for each one:

- the draft's candidate is its own greedy token there (``argmax q``);
- the label is greedy acceptance, ``[candidate == the target's next token]``;
- the head's input is the draft's hidden state after reading the candidate
  (``specdec_pp.candidate_hidden``), as in the decode loop, including for the
  rejected candidates that a teacher-forced pass never reads.

The draft is frozen, so the features are computed once and the head is fitted
on them (``specdec_pp.fit_head``). The last ``--heldout`` fraction of the
documents is held out: the script reports the held-out BCE of the head and of
the best constant (the constant prior that ``specdec_prior`` stands for), and
the accuracy at 1/2. Labels are greedy acceptance: at temperature > 0 the head
is a proxy. Writes ``OUT/head.npz`` (``tokax.decode.proposers.save_params``)
and ``OUT/summary.json``; ``--config.specdec_head=trained`` uses the copy
shipped in ``tokax/assets/gemma3_270m_specdec_head``.
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

CONT = 64  # continuation tokens per document


def features(dcfg, dparams, pairs, batch: int, progress=None):
    """(hidden after each candidate ``[N, D]``, greedy acceptance ``[N]``) over all pairs."""
    from tokax.decode.proposers.draft_model import draft_forward, draft_unembed
    from tokax.decode.proposers.specdec_pp import candidate_hidden
    from tokax.model.decoder import padded_positions
    from tokax.data.greedy import continuation_batch

    L = max(len(p) for p, _ in pairs) + CONT

    @jax.jit
    def run(seqs, lengths, at, target_next):
        _, h, _ = draft_forward(dcfg, dparams, seqs, padded_positions(lengths, L), return_logits=False)
        h_at = jnp.take_along_axis(h, at[:, :, None], axis=1)  # [B, J, D]
        cand = jnp.argmax(draft_unembed(dcfg, dparams, h_at), -1).astype(jnp.int32)
        return candidate_hidden(dcfg, dparams, seqs, lengths, at, cand), cand == target_next

    xs, ys = [], []
    starts = range(0, len(pairs), batch)
    for s in (progress or (lambda r: r))(starts):
        chunk = pairs[s:s + batch]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch - n)  # a fixed shape: one compile
        seqs, lengths, at, nxt = continuation_batch(chunk, L)
        hid, ok = run(*(jnp.asarray(a) for a in (seqs, lengths, at, nxt)))
        xs.append(np.asarray(hid[:n]).reshape(-1, hid.shape[-1]))
        ys.append(np.asarray(ok[:n]).reshape(-1))
    return np.concatenate(xs), np.concatenate(ys).astype(np.float32)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draft", default="distilled")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=1024, help="examples per head step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight_decay", type=float, default=0.01)
    ap.add_argument("--hidden", type=int, default=256, help="the head MLP's width")
    ap.add_argument("--heldout", type=float, default=0.1, help="fraction of documents held out")
    ap.add_argument("--feature_batch", type=int, default=16)
    ap.add_argument("--out", default=os.path.join(ROOT, "tokax", "assets", "gemma3_270m_specdec_head"))
    args = ap.parse_args(argv)

    from tqdm.auto import tqdm

    from tokax.decode import proposers as P
    from tokax.decode.proposers import specdec_pp
    from tokax.decode.proposers.distilled import make_draft
    from tokax.model.loaders.gguf import load_gemma3
    from tokax.tokenize import load_gemma3_tokenizer
    from tokax.data.greedy import greedy_code_pairs

    t0 = time.perf_counter()
    cfg, params = load_gemma3("float32")
    dcfg, dparams = make_draft(cfg, params, args.draft)
    pairs = greedy_code_pairs(load_gemma3_tokenizer())
    n_held = int(round(len(pairs) * args.heldout))
    x, y = features(dcfg, dparams, pairs, args.feature_batch, lambda r: tqdm(r, desc="draft features"))
    split = (len(pairs) - n_held) * CONT
    xtr, ytr, xte, yte = x[:split], y[:split], x[split:], y[split:]
    head = specdec_pp.init_head(dcfg.d_model, jax.random.PRNGKey(0), hidden_dim=args.hidden,
                                prior=float(np.clip(ytr.mean(), 0.01, 0.99)))
    before = specdec_pp.head_bce(head, xte, yte)
    head, losses = specdec_pp.fit_head(head, xtr, ytr, args.steps, args.batch, args.lr, args.weight_decay,
                                       progress=lambda r: tqdm(r, desc="specdec head"))
    res = {"draft": args.draft, "documents": len(pairs), "heldout_documents": n_held,
           "train_examples": int(ytr.size), "train_accept_rate": round(float(ytr.mean()), 4),
           "steps": args.steps, "batch": args.batch, "lr": args.lr, "weight_decay": args.weight_decay,
           "hidden": args.hidden, "last_loss": round(float(np.mean(losses[-50:])), 4),
           "heldout_constant_head": before, "heldout": specdec_pp.head_bce(head, xte, yte),
           "seconds": round(time.perf_counter() - t0, 1),
           "command": "python experiments/train_specdec_head.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(json.dumps(res), flush=True)
    P.save_asset(args.out, "head.npz", head, res)
    return res


if __name__ == "__main__":
    main()
