"""Training prediction heads on a frozen target (blockwise parallel decoding,
Stern et al. 2018; Medusa-1, Cai et al. 2024).

Head ``i`` (1..k) reads the target's final-normed hidden state ``h_t`` (the
state after token ``t``) and predicts token ``t+1+i``; its logits are
``E f_i(h_t)`` with ``E`` the target's tied embedding (``head_fn`` gives
``f [..., k, D]``; by default ``tokax.model.heads.apply_heads``, the one the
decoder uses). Per head, over valid positions:

    L_i = (1 - w) * CE(E f_i(h_t), y_{t,i}) + w * KL(p(. | x_{<=t+i}) || q_i(. | x_{<=t}))

where the label ``y_{t,i}`` is either the data token ``x_{t+1+i}`` (the
paper's objective) or the target's own greedy token at ``t+i``,
``argmax p(. | x_{<=t+i})`` (what greedy acceptance checks, Medusa-2's
self-distillation in its hard form), and the KL term distils the target's
full next-token distribution at ``t+i`` (soft self-distillation). The
target is frozen: its hidden states are inputs (``target_hidden``
precomputes them once, so many head steps reuse one target pass).

Vocabulary: with ``cand`` ids the softmax runs over ``E[cand]`` only (a
sampled softmax with the batch's labels plus extra negatives), which makes
a 262k-token vocabulary trainable on CPU; without, over the full vocabulary
(chunked with ``tokax.train.logprobs`` when ``chunk_size`` is set).
Accuracy is measured with the full-vocabulary argmax. ``head_vocab`` > 0
(config) instead fixes the vocabulary to the most frequent corpus tokens:
full softmax over that subset in training, accuracy over it, and the saved
heads carry ``head_ids`` so that decoding drafts from the same subset.

``run(config)`` trains from ``configs/blockwise.py``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tokax.model.config import ModelConfig
from tokax.model.decoder import forward
from tokax.model.heads import apply_heads, init_heads
from tokax.train.logprobs import token_kl, token_logprobs

Params = Any
HeadFn = Callable[[Params, jax.Array], jax.Array]  # (hparams, hidden [..., D]) -> features [..., k, D]
log = logging.getLogger(__name__)


def shift_ahead(x: np.ndarray | jax.Array, k: int, offset: int, fill: int = 0):
    """``out[b, t, i-1] = x[b, t + offset + i]`` for ``i = 1..k``, and the mask of
    positions where that index exists. ``x [B, T]`` -> ``([B, T, k], [B, T, k] bool)``.
    Labels: data tokens use ``offset=1`` (token t+1+i), greedy tokens ``offset=0``
    (the target's argmax at t+i predicts token t+1+i)."""
    xp = jnp if isinstance(x, jax.Array) else np
    B, T = x.shape
    outs, oks = [], []
    for i in range(1, k + 1):
        s = offset + i
        pad = xp.full((B, min(s, T)), fill, x.dtype)
        outs.append(xp.concatenate([x[:, s:], pad], axis=1)[:, :T])
        oks.append(xp.broadcast_to(xp.arange(T)[None, :] + s < T, (B, T)))
    return xp.stack(outs, -1), xp.stack(oks, -1)


def _ahead_hidden(hidden: jax.Array, k: int) -> jax.Array:
    """``out[b, t, i-1] = hidden[b, t+i]`` (zeros past the end): ``[B, T, D]`` -> ``[B, T, k, D]``."""
    B, T, D = hidden.shape
    padded = jnp.concatenate([hidden, jnp.zeros((B, k, D), hidden.dtype)], axis=1)
    return jnp.stack([padded[:, i : i + T] for i in range(1, k + 1)], axis=2)


def heads_loss(
    head_fn: HeadFn,
    hparams: Params,
    hidden: jax.Array,  # [B, T, D] target hidden states (frozen)
    embed: jax.Array,  # [V', D] the target's embedding, or its rows E[cand]
    labels: jax.Array,  # [B, T, k] indices into embed's rows
    valid: jax.Array,  # [B, T, k] bool
    *,
    distill_weight: float = 0.0,
    chunk_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``sum_i L_i`` (module docstring) and per-head metrics ``ce [k]``, ``kl [k]``."""
    hidden = jax.lax.stop_gradient(hidden.astype(jnp.float32))
    embed = jax.lax.stop_gradient(embed.astype(jnp.float32))
    f = head_fn(hparams, hidden)  # [B, T, k, D]
    k = f.shape[2]
    m = valid.astype(jnp.float32)
    count = jnp.maximum(m.sum((0, 1)), 1.0)  # [k]
    ce = -token_logprobs(f, embed, labels.astype(jnp.int32), chunk_size=chunk_size)  # [B, T, k]
    ce_h = (ce * m).sum((0, 1)) / count
    if distill_weight > 0.0:
        ref = _ahead_hidden(hidden, k)  # the target's state at t+i predicts token t+1+i
        kl = token_kl(f, embed, ref, embed, chunk_size=chunk_size)  # [B, T, k]
        kl_h = (kl * m).sum((0, 1)) / count
    else:
        kl_h = jnp.zeros((k,), jnp.float32)
    loss = jnp.sum((1.0 - distill_weight) * ce_h + distill_weight * kl_h)
    return loss, {"ce": ce_h, "kl": kl_h}


def head_accuracy(head_fn: HeadFn, hparams: Params, hidden: jax.Array, embed: jax.Array, labels: jax.Array,
                  valid: jax.Array, rows: int | None = None) -> np.ndarray:
    """Per-head top-1 accuracy ``[k]`` of ``argmax_v (E f_i)_v == labels`` over
    valid positions, full vocabulary (``rows`` sequences per jitted call;
    default: as many as keep the float32 logits under 256 MiB)."""
    if rows is None:
        per_row = hidden.shape[1] * labels.shape[2] * embed.shape[0] * 4
        rows = max(1, (256 << 20) // per_row)

    @jax.jit
    def hits(h, lab, ok):
        f = head_fn(hparams, h.astype(jnp.float32))
        lg = jnp.einsum("btkd,vd->btkv", f.astype(embed.dtype), embed, preferred_element_type=jnp.float32)
        top = jnp.argmax(lg, -1)
        return ((top == lab) & ok).sum((0, 1)), ok.sum((0, 1))

    num = den = 0
    for s in range(0, hidden.shape[0], rows):
        sl = slice(s, s + rows)
        a, b = hits(jnp.asarray(hidden[sl]), jnp.asarray(labels[sl]), jnp.asarray(valid[sl]))
        num, den = num + np.asarray(a), den + np.asarray(b)
    return num / np.maximum(den, 1)


def target_hidden(cfg: ModelConfig, tparams: Params, tokens: np.ndarray, rows: int = 4,
                  progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One frozen target pass over ``tokens [N, T]`` (no cache, causal):
    final-normed hidden states ``[N, T, D]`` float32 and the target's greedy
    token at every position ``[N, T]`` (argmax of its logits: the token it
    predicts next)."""

    @jax.jit
    def run(tp, x):
        pos = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32)[None], x.shape)
        _, h, _ = forward(cfg, tp, x, pos, return_logits=False)
        lg = jnp.einsum("btd,vd->btv", h, tp["embed"], preferred_element_type=jnp.float32)
        return h.astype(jnp.float32), jnp.argmax(lg, -1).astype(jnp.int32)

    hs, gs = [], []
    for s in range(0, tokens.shape[0], rows):
        h, g = run(tparams, jnp.asarray(tokens[s : s + rows]))
        hs.append(np.asarray(h))
        gs.append(np.asarray(g))
        if progress is not None:
            progress(min(s + rows, tokens.shape[0]), tokens.shape[0])
    return np.concatenate(hs), np.concatenate(gs)


def to_subset(labels: np.ndarray, ids: np.ndarray, outside: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids -> indices into the sorted id subset ``ids``, and whether each id is in it
    (ids outside get index ``outside``)."""
    idx = np.clip(np.searchsorted(ids, labels), 0, len(ids) - 1)
    inside = ids[idx] == labels
    return np.where(inside, idx, outside).astype(np.int32), inside


def restrict_vocab(labels: np.ndarray, size: int, negatives: np.ndarray, vocab: int,
                   rng: np.random.Generator, random_frac: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Candidate vocabulary for a sampled softmax, ``size`` ids, sorted: the
    batch's label ids, then fresh uniform random ids (``random_frac`` of the
    rest: over many steps every id is pushed down now and then, so the
    full-vocabulary argmax does not drift to tokens never seen as
    negatives), then ids from ``negatives`` (frequent tokens: the hard
    competitors). Returns ``(cand [size], labels as indices into cand)``."""
    need = np.unique(labels)
    if need.size > size:
        raise ValueError(f"heads.cand_size={size} is smaller than the batch's {need.size} distinct labels; raise it")
    n_rand = int(random_frac * (size - need.size))
    rand = np.setdiff1d(rng.choice(vocab, size=min(vocab, 2 * n_rand + 8), replace=False), need)[:n_rand]
    cand = np.union1d(need, rand)
    cand = np.union1d(cand, np.setdiff1d(negatives, cand, assume_unique=False)[: size - cand.size])
    if cand.size < size:
        pool = np.setdiff1d(np.arange(vocab), cand)
        cand = np.union1d(cand, rng.choice(pool, size=size - cand.size, replace=False))
    return cand.astype(np.int32), np.searchsorted(cand, labels).astype(np.int32)


def train_heads(
    head_fn: HeadFn,
    hparams: Params,
    embed: jax.Array,  # [V, D]
    batches: Iterable[Mapping[str, np.ndarray]],  # hidden [b,T,D], labels [b,T,k], valid [b,T,k], optional cand [M]
    *,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    distill_weight: float = 0.0,
    chunk_size: int | None = None,
    total_steps: int | None = None,
    callback: Callable[[int, float, dict], None] | None = None,
) -> tuple[Params, list[float]]:
    """AdamW (cosine decay when ``total_steps`` is given) on the heads only;
    returns the trained heads and the loss per step. A batch with ``cand``
    has ``labels`` indexing ``cand`` (``restrict_vocab``)."""
    lr = optax.cosine_decay_schedule(learning_rate, total_steps) if total_steps else learning_rate
    opt = optax.adamw(lr, weight_decay=weight_decay)
    state = opt.init(hparams)

    @jax.jit
    def step(hp, st, emb, hidden, labels, valid):
        def loss_fn(p):
            return heads_loss(head_fn, p, hidden, emb, labels, valid, distill_weight=distill_weight,
                              chunk_size=chunk_size)

        (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(hp)
        upd, st = opt.update(g, st, hp)
        return optax.apply_updates(hp, upd), st, loss, metrics

    losses = []
    for i, b in enumerate(batches):
        emb = embed[jnp.asarray(b["cand"])] if "cand" in b else embed
        hparams, state, loss, metrics = step(hparams, state, emb, jnp.asarray(b["hidden"]), jnp.asarray(b["labels"]),
                                             jnp.asarray(b["valid"]))
        loss = float(loss)
        if not np.isfinite(loss):
            raise FloatingPointError(f"heads training: non-finite loss {loss} at step {i}; lower heads.lr")
        losses.append(loss)
        if callback is not None:
            callback(i, loss, metrics)
    return hparams, losses


# ----------------------------------------------------------------------------
# run(config): data -> target hidden states -> heads
# ----------------------------------------------------------------------------


def token_rows(tok: Any, pieces: list[str], n_rows: int, seq_len: int) -> np.ndarray:
    """``[n_rows, seq_len]`` windows of ``[bos] + text`` of consecutive pieces
    (non-overlapping, each within one piece; short tails dropped)."""
    rows: list[list[int]] = []
    for p in pieces:
        ids = [tok.bos_id] + list(tok.encode(p))
        for s in range(0, len(ids) - seq_len + 1, seq_len):
            rows.append(ids[s : s + seq_len])
            if len(rows) == n_rows:
                return np.asarray(rows, np.int32)
    if not rows:
        raise ValueError(f"no corpus piece has {seq_len} tokens; lower heads.seq_len")
    return np.asarray(rows, np.int32)


def load_target(c) -> tuple[ModelConfig, Params, Any]:
    """(cfg, params, tokenizer) of ``c.target`` (``configs/blockwise.py``)."""
    from tokax.model import config as mc
    from tokax.train.data import get_tokenizer

    tok = get_tokenizer(c.tokenizer)
    if c.target.init == "gemma3":
        from tokax.model.loaders.gguf import load_gemma3

        cfg, params = load_gemma3(c.target.dtype)
        return cfg, params, tok
    if c.target.init != "random":
        raise ValueError(f"target.init={c.target.init!r}: use 'random' or 'gemma3'")
    from tokax.model.decoder import init_params

    cfg = mc.PRESETS[c.target.preset](**dict(c.target.overrides))
    params = init_params(cfg, jax.random.PRNGKey(c.target.seed))
    # A small embedding keeps a random target's next-token distributions spread.
    params = dict(params, embed=params["embed"] * c.target.embed_init_std)
    return cfg, params, tok


def run(c, head_fn: HeadFn = apply_heads, init_fn: Callable[[int, int, jax.Array], Params] | None = None,
        log_file: str | None = None) -> dict:
    """Train heads per config ``c`` (``configs/blockwise.py``): ``head_fn`` and ``init_fn(d, k, rng)``
    default to ``tokax.model.heads`` (Medusa's zero init). Returns a
    summary dict with per-head held-out accuracy vs the target's greedy token
    (and vs the data token) before and after training, and the trained
    ``hparams`` (the caller saves them, e.g. ``tokax.decode.proposers.save_params``)."""
    from tokax.data.stdlib import corpus_pieces

    t0 = time.time()
    out = open(log_file, "a") if log_file else None

    def say(**kv):
        kv["t"] = round(time.time() - t0, 1)
        line = json.dumps(kv)
        log.info(line)
        print(line, file=sys.stderr, flush=True)  # progress lines; the summary is the result
        if out:
            out.write(line + "\n")
            out.flush()

    cfg, tparams, tok = load_target(c)
    k, T = c.k, c.seq_len
    say(event="loaded", model=cfg.name, vocab=cfg.vocab_size, d_model=cfg.d_model)
    train_tok = token_rows(tok, corpus_pieces("train", max_files=c.max_files or None), c.train_rows, T)
    eval_tok = token_rows(tok, corpus_pieces("eval", max_files=c.max_files or None), c.eval_rows, T)
    say(event="data", train_rows=int(train_tok.shape[0]), eval_rows=int(eval_tok.shape[0]), seq_len=T)
    prog = lambda i, n: say(event="target_pass", rows=i, of=n) if i % (8 * c.target_batch) == 0 or i == n else None
    cache = c.get("hidden_cache", "")
    passes = None
    if cache and os.path.exists(cache):
        # Same corpus rows, same target: reuse the target pass (the slow part on CPU).
        with np.load(cache) as z:
            if z["train_tok"].shape == train_tok.shape and (z["train_tok"] == train_tok).all():
                passes = z["h_tr"], z["g_tr"], z["h_ev"], z["g_ev"]
                say(event="hidden_cache", path=cache)
    if passes is None:
        passes = (*target_hidden(cfg, tparams, train_tok, c.target_batch, prog),
                  *target_hidden(cfg, tparams, eval_tok, c.target_batch, prog))
        if cache:
            with open(cache, "wb") as f:
                np.savez(f, train_tok=train_tok, h_tr=passes[0], g_tr=passes[1], h_ev=passes[2], g_ev=passes[3])
    h_tr, g_tr, h_ev, g_ev = passes

    def labels_of(tokens, greedy):
        return shift_ahead(greedy, k, 0) if c.labels == "greedy" else shift_ahead(tokens, k, 1)

    lab_tr, ok_tr = labels_of(train_tok, g_tr)
    lab_ev_g, ok_ev_g = shift_ahead(g_ev, k, 0)
    lab_ev_d, ok_ev_d = shift_ahead(eval_tok, k, 1)
    embed = jnp.asarray(tparams["embed"])
    head_ids = None
    if int(c.get("head_vocab", 0) or 0):
        # Heads over a fixed frequent-token subset S (full softmax over S; the decoder restricts
        # drafts to S too): no sampled-softmax drift, and 1/16 of the unembedding's cost.
        from tokax.data.stdlib import frequent_token_ids

        head_ids = frequent_token_ids(tok, int(c.head_vocab), "train", max_files=c.max_files or None)
        embed = embed[jnp.asarray(head_ids)]
        lab_tr, inside = to_subset(lab_tr, head_ids)
        ok_tr = ok_tr & inside
        lab_ev_g, _ = to_subset(lab_ev_g, head_ids, outside=-1)  # a label outside S counts as a miss
        lab_ev_d, _ = to_subset(lab_ev_d, head_ids, outside=-1)
        say(event="head_vocab", size=int(len(head_ids)), train_labels_in_subset=round(float(inside.mean()), 4))
    init_fn = init_fn or (lambda d, n, rng: init_heads(d, n))
    hparams = init_fn(cfg.d_model, k, jax.random.PRNGKey(c.seed))
    acc0 = head_accuracy(head_fn, hparams, h_ev, embed, lab_ev_g, ok_ev_g)
    say(event="eval", step=0, acc_vs_greedy=acc0.round(4).tolist())

    rng = np.random.default_rng(c.seed)
    uniq, freq = np.unique(lab_tr, return_counts=True)
    negatives = uniq[np.argsort(-freq)]

    def batches():
        for _ in range(c.steps):
            idx = rng.choice(h_tr.shape[0], size=c.batch_size, replace=False)
            b = {"hidden": h_tr[idx], "labels": lab_tr[idx], "valid": ok_tr[idx]}
            if head_ids is None and c.cand_size and c.cand_size < cfg.vocab_size:
                b["cand"], b["labels"] = restrict_vocab(b["labels"], c.cand_size, negatives, cfg.vocab_size, rng)
            yield b

    def cb(i, loss, m):
        if i % c.log_every == 0 or i == c.steps - 1:
            say(event="train", step=i, loss=round(loss, 4), ce=np.asarray(m["ce"]).round(3).tolist())

    hparams, losses = train_heads(head_fn, hparams, embed, batches(), learning_rate=c.lr, weight_decay=c.weight_decay,
                                  distill_weight=c.distill_weight, chunk_size=c.chunk_size or None,
                                  total_steps=c.steps, callback=cb)
    acc = head_accuracy(head_fn, hparams, h_ev, embed, lab_ev_g, ok_ev_g)
    acc_d = head_accuracy(head_fn, hparams, h_ev, embed, lab_ev_d, ok_ev_d)
    # Reference point: how often the target's greedy token is the data token (head 0 would be the target itself).
    base = float((g_ev[:, :-1] == eval_tok[:, 1:]).mean())
    if head_ids is not None:
        hparams = dict(hparams, head_ids=jnp.asarray(head_ids, jnp.int32))
    summary = {"event": "done", "steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1],
               "acc_vs_greedy_before": acc0.round(4).tolist(), "acc_vs_greedy": acc.round(4).tolist(),
               "acc_vs_data": acc_d.round(4).tolist(), "target_greedy_vs_data": round(base, 4)}
    say(**summary)
    if out:
        out.close()
    return {**summary, "hparams": hparams}
