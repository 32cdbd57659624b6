"""SpecDec++: adaptive candidate lengths from an acceptance-prediction head (Huang et al. 2024).

A head on the draft model predicts, from the draft's hidden state after it
read candidate ``x_i``, the probability ``a_i`` that the target accepts
``x_i``. Drafting stops as soon as the predicted probability that at least
one candidate of the round is rejected exceeds a threshold ``h``:

    1 - prod_{j <= i} a_j > h

(the paper's threshold policy, optimal for its MDP formulation), or at the
maximum ``K``. The head here is a two-layer MLP, ``a = sigmoid(w2 ·
gelu(W1 h + b1) + b2)``. ``train_head`` fits it with a weighted binary
cross-entropy against the acceptance probability of teacher-forced tokens,
``min(1, p(x)/q(x))`` (sampling) or ``[argmax p == x]`` (greedy), the draft
and target frozen.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tokax.decode.proposers.draft_model import DraftModelProposer, draft_forward
from tokax.decode.sampling import SamplingParams, process_logits
from tokax.model import kv_cache as kvc
from tokax.model.config import ModelConfig
from tokax.model.decoder import Params, forward, padded_positions


@dataclasses.dataclass(frozen=True)
class SpecDecPPProposer(DraftModelProposer):
    """``pparams = {"model": draft decoder params, "head": init_head(...)}``."""

    threshold: float = 0.7  # stop when predicted P(at least one rejection) exceeds it

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"specdec_pp threshold={self.threshold} must be in [0, 1]")

    def draft_params(self, tparams: Params, pparams: Any) -> Params:
        return pparams["model"]

    def continue_before(self, pparams, hidden, score):
        score = score * acceptance_prob(pparams["head"], hidden)
        return (1.0 - score) <= self.threshold, score


def init_head(d_model: int, rng: jax.Array, hidden_dim: int | None = None, prior: float = 0.8,
              scale: float = 0.0) -> Params:
    """Head params. The output bias starts at logit(prior), so an untrained
    head predicts acceptance ``prior`` everywhere (a fixed candidate length
    that the threshold sets); ``scale > 0`` randomizes the output weights
    (tests: rounds of varying length)."""
    H = hidden_dim or d_model
    k1, k2 = jax.random.split(rng)
    return {
        "w1": jax.random.normal(k1, (d_model, H), jnp.float32) * d_model**-0.5,
        "b1": jnp.zeros((H,), jnp.float32),
        "w2": jax.random.normal(k2, (H,), jnp.float32) * scale * H**-0.5,
        "b2": jnp.asarray(jnp.log(prior / (1.0 - prior)), jnp.float32),
    }


def acceptance_logit(head: Params, hidden: jax.Array) -> jax.Array:
    """``hidden [..., D]`` -> logit of P(candidate accepted) ``[...]``."""
    z = jax.nn.gelu(hidden.astype(jnp.float32) @ head["w1"] + head["b1"], approximate=True)
    return z @ head["w2"] + head["b2"]


def acceptance_prob(head: Params, hidden: jax.Array) -> jax.Array:
    return jax.nn.sigmoid(acceptance_logit(head, hidden))


def acceptance_targets(p_logits: jax.Array, q_logits: jax.Array, tokens: jax.Array, sp: SamplingParams) -> jax.Array:
    """Acceptance probability of ``tokens[:, 1:]`` given the target and draft
    logits at the positions before them ``[B, T-1, V]``: ``[argmax p == x]``
    when greedy, else ``min(1, p(x)/q(x))`` under the sampling processors."""
    x = tokens[:, 1:, None]

    def greedy(_):
        return (jnp.argmax(p_logits, -1) == tokens[:, 1:]).astype(jnp.float32)

    def sampled(_):
        lp = jnp.take_along_axis(jax.nn.log_softmax(process_logits(p_logits, sp), -1), x, -1)[..., 0]
        lq = jnp.take_along_axis(jax.nn.log_softmax(process_logits(q_logits, sp), -1), x, -1)[..., 0]
        return jnp.exp(jnp.minimum(lp - lq, 0.0))

    return jax.lax.cond(sp.temperature <= 0.0, greedy, sampled, None)


def head_loss(proposer: SpecDecPPProposer, target_cfg: ModelConfig, tparams: Params, pparams: Any,
              tokens: jax.Array, sp: SamplingParams, reject_weight: float = 1.0,
              draft_tokens_only: bool = False) -> jax.Array:
    """Weighted BCE of the head on teacher-forced ``tokens [B, T]``: label
    ``y`` = acceptance probability of token t, input = the draft's hidden
    state at t; ``-(y log a + w (1 - y) log(1 - a))`` (the paper up-weights
    rejections with ``w``). ``draft_tokens_only``: average only over the
    positions whose token is the draft's own greedy choice there, the tokens
    a greedy draft would actually propose (the paper trains on text the
    draft generated; this is its teacher-forced stand-in)."""
    B, T = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
    frozen = jax.lax.stop_gradient
    p_logits, _, _ = forward(target_cfg, frozen(tparams), tokens, pos)
    q_logits, q_hidden, _ = draft_forward(proposer.cfg, frozen(pparams["model"]), tokens, pos)
    y = acceptance_targets(p_logits[:, :-1], q_logits[:, :-1], tokens, sp)  # [B, T-1]
    z = acceptance_logit(pparams["head"], q_hidden[:, 1:])
    bce = -(y * jax.nn.log_sigmoid(z) + reject_weight * (1.0 - y) * jax.nn.log_sigmoid(-z))
    if not draft_tokens_only:
        return jnp.mean(bce)
    w = (jnp.argmax(q_logits[:, :-1], -1) == tokens[:, 1:]).astype(jnp.float32)
    return jnp.sum(w * bce) / jnp.maximum(jnp.sum(w), 1.0)


def train_head(
    proposer: SpecDecPPProposer,
    target_cfg: ModelConfig,
    tparams: Params,
    pparams: Any,
    batches: Iterable[jax.Array],
    sp: SamplingParams,
    learning_rate: float = 1e-3,
    reject_weight: float = 1.0,
    draft_tokens_only: bool = False,
) -> tuple[Any, list[float]]:
    """Fit ``pparams["head"]`` with Adam on token batches ``[B, T]`` (ideally
    text drafted by the draft itself, as in the paper); returns the updated
    ``pparams`` and the loss per step."""
    opt = optax.adam(learning_rate)
    state = opt.init(pparams["head"])

    @jax.jit
    def step(head, state, tokens, tparams, model):
        def loss_fn(h):
            return head_loss(proposer, target_cfg, tparams, {"model": model, "head": h}, tokens, sp, reject_weight,
                             draft_tokens_only)

        loss, g = jax.value_and_grad(loss_fn)(head)
        upd, state = opt.update(g, state, head)
        return optax.apply_updates(head, upd), state, loss

    head, losses = pparams["head"], []
    for tokens in batches:
        head, state, loss = step(head, state, jnp.asarray(tokens), tparams, pparams["model"])
        losses.append(float(loss))
    return dict(pparams, head=head), losses


def candidate_hidden(cfg: ModelConfig, dparams: Any, seqs: jax.Array, lengths: jax.Array, at: jax.Array,
                     cands: jax.Array) -> jax.Array:
    """The draft's hidden state after it reads candidate ``cands[b, j]`` in place of
    ``seqs[b, at[b, j] + 1]``, for every ``j`` at once: ``[B, J, D]``.

    ``seqs [B, L]`` holds ``lengths [B]`` real tokens each (right padding), ``at [B, J]``
    the position each candidate follows (``< lengths``). This is the input the head sees
    while drafting when the accepted prefix is ``seqs[b, :at + 1]`` and the draft proposed
    ``cands[b, j]`` next. One pass over ``L + J`` tokens: the sequence causally, each
    candidate at position ``at + 1`` seeing the sequence up to ``at`` and itself only
    (a block mask over an empty cache), so no candidate sees another or the token it replaces."""
    B, L = seqs.shape
    J = cands.shape[1]
    ar = jnp.arange(L, dtype=jnp.int32)[None]
    tokens = jnp.concatenate([seqs, cands], axis=1)
    positions = jnp.concatenate([padded_positions(lengths, L), at + 1], axis=1)
    seq_rows = jnp.concatenate([jnp.ones((B, L, L), bool), jnp.zeros((B, L, J), bool)], axis=2)
    sees_seq = ar[:, None, :] <= at[:, :, None]  # [B, J, L]
    cand_rows = jnp.concatenate([sees_seq, jnp.broadcast_to(jnp.eye(J, dtype=bool), (B, J, J))], axis=2)
    mask = jnp.concatenate([seq_rows, cand_rows], axis=1)  # [B, L + J, L + J]
    cache = kvc.init_cache(cfg, B, L + J)
    _, hidden, _ = draft_forward(cfg, dparams, tokens, positions, cache, block_mask=mask, return_logits=False)
    return hidden[:, L:]


def fit_head(head: Params, features: jax.Array, labels: jax.Array, steps: int, batch: int = 1024,
             learning_rate: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
             progress=None) -> tuple[Params, list[float]]:
    """Fit the head by BCE on precomputed ``features [N, D]`` (draft hidden states, e.g.
    ``candidate_hidden``) and acceptance ``labels [N]`` in [0, 1], with AdamW on random
    minibatches; returns the head and the loss per step. ``progress``: a callable wrapping
    the step range (``tqdm``)."""
    opt = optax.adamw(learning_rate, weight_decay=weight_decay)
    state = opt.init(head)
    features = jnp.asarray(features, jnp.float32)
    labels = jnp.asarray(labels, jnp.float32)
    N = features.shape[0]

    @jax.jit
    def step(head, state, idx):
        x, y = features[idx], labels[idx]

        def loss_fn(h):
            z = acceptance_logit(h, x)
            return -jnp.mean(y * jax.nn.log_sigmoid(z) + (1.0 - y) * jax.nn.log_sigmoid(-z))

        loss, g = jax.value_and_grad(loss_fn)(head)
        upd, state = opt.update(g, state, head)
        return optax.apply_updates(head, upd), state, loss

    rng = np.random.default_rng(seed)
    losses = []
    for _ in (progress or (lambda r: r))(range(steps)):
        head, state, loss = step(head, state, jnp.asarray(rng.integers(0, N, min(batch, N))))
        losses.append(float(loss))
    return head, losses


def head_bce(head: Params, features: jax.Array, labels: jax.Array) -> dict:
    """Held-out BCE of the head and of the best constant (the labels' mean) on
    ``features [N, D]`` / ``labels [N]``, and the head's accuracy at 1/2."""
    y = np.asarray(labels, np.float64)
    a = np.clip(np.asarray(jax.jit(acceptance_prob)(head, jnp.asarray(features, jnp.float32)), np.float64),
                1e-7, 1 - 1e-7)
    m = float(np.clip(y.mean(), 1e-7, 1 - 1e-7))
    return {"n": int(y.size), "accept_rate": round(float(y.mean()), 4),
            "bce_head": round(float(-(y * np.log(a) + (1 - y) * np.log(1 - a)).mean()), 4),
            "bce_best_constant": round(float(-(y * np.log(m) + (1 - y) * np.log(1 - m)).mean()), 4),
            "accuracy_at_half": round(float(((a > 0.5) == (y > 0.5)).mean()), 4),
            "accuracy_best_constant": round(max(float(y.mean()), 1 - float(y.mean())), 4)}
