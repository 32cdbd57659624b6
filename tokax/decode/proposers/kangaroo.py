"""Kangaroo: lossless self-speculative decoding via double early exiting (Liu et al. 2024).

The draft is the target's own first ``l`` layers, a small trained adapter and
the target's LM head (final norm + tied embedding):

    q(. | x) = softmax(W_emb · Norm(Adapter(Layers_{<l}(x))))

Drafting stops early (the second "early exit") once the draft's confidence,
its top-1 probability ``max_v q(v)`` (softmax of the raw draft logits, no
temperature), falls below a threshold: the token just drawn is still
proposed, further ones are not.

Here the adapter is one Gemma block (attention + GeGLU FFN with the target's
widths) appended as layer ``l`` of a decoder whose layers ``< l`` are the
target's, and the draft keeps its own KV cache for those ``l + 1`` layers.
Deviation from the paper: the paper reuses the shallow layers' features of
the drafted tokens in the verify pass (saving ``l / L`` of it); here the
target recomputes them. With the adapter's output projections at zero
(``init_adapter(identity=True)``) the draft is plain early exit after ``l``
layers. ``train_adapter`` distils the adapter from the frozen target.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import optax

from tokax.decode.proposers.draft_model import DraftModelProposer
from tokax.model.config import ModelConfig
from tokax.model.decoder import Block, Params, forward


@dataclasses.dataclass(frozen=True)
class KangarooProposer(DraftModelProposer):
    """``cfg`` is the draft's config (``KangarooProposer.make`` derives it
    from the target's); ``pparams`` is the adapter's params."""

    n_shallow: int = 2
    threshold: float = 0.6  # stop drafting after a token whose draft top-1 prob < threshold

    @classmethod
    def make(cls, target_cfg: ModelConfig, n_shallow: int = 2, k: int = 6, threshold: float = 0.6):
        if not 1 <= n_shallow < target_cfg.n_layers:
            raise ValueError(
                f"kangaroo n_shallow={n_shallow} must be in [1, {target_cfg.n_layers - 1}] "
                "(fewer layers than the target)"
            )
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"kangaroo threshold={threshold} must be in [0, 1]")
        cfg = target_cfg.replace(n_layers=n_shallow + 1, name=f"{target_cfg.name}-kangaroo{n_shallow}")
        return cls(cfg=cfg, k=k, n_shallow=n_shallow, threshold=threshold)

    def draft_params(self, tparams: Params, adapter: Any) -> Params:
        return kangaroo_params(tparams, adapter, self.n_shallow)

    def continue_after(self, q_logits: jax.Array) -> jax.Array:
        conf = jnp.max(jax.nn.softmax(q_logits.astype(jnp.float32), axis=-1), axis=-1)  # [B]
        return conf >= self.threshold


def kangaroo_params(tparams: Params, adapter: Params, n_shallow: int) -> Params:
    """Decoder params of the self-draft: the target's embedding, final norm and
    first ``n_shallow`` layers, with the adapter as the last layer."""
    out = {"embed": tparams["embed"], "final_norm": tparams["final_norm"], f"layer_{n_shallow}": adapter}
    for i in range(n_shallow):
        out[f"layer_{i}"] = tparams[f"layer_{i}"]
    return out


def init_adapter(target_cfg: ModelConfig, n_shallow: int, rng: jax.Array, identity: bool = True) -> Params:
    """Params of the adapter block (layer ``n_shallow`` of the draft). With
    ``identity=True`` its attention-output and FFN-down projections are zero,
    so the block passes its input through and the draft starts as plain early
    exit; otherwise all weights are random (tests)."""
    cfg = target_cfg.replace(n_layers=n_shallow + 1)
    x = jnp.zeros((1, 1, cfg.d_model), cfg.jnp_dtype)
    pos = jnp.zeros((1, 1), jnp.int32)
    params = Block(cfg, n_shallow).init(rng, x, pos, None, None, None)["params"]
    if identity:
        params = dict(params, o=jnp.zeros_like(params["o"]), down=jnp.zeros_like(params["down"]))
    return params


def distill_loss(proposer: KangarooProposer, target_cfg: ModelConfig, tparams: Params, adapter: Params,
                 tokens: jax.Array) -> jax.Array:
    """Mean over positions of KL(p_target || q_draft) on ``tokens [B, T]``
    (teacher forcing, no cache): the adapter's training objective."""
    B, T = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
    p_logits, _, _ = forward(target_cfg, jax.lax.stop_gradient(tparams), tokens, pos)
    q_logits, _, _ = forward(proposer.cfg, proposer.draft_params(jax.lax.stop_gradient(tparams), adapter), tokens, pos)
    logp = jax.nn.log_softmax(p_logits, -1)
    logq = jax.nn.log_softmax(q_logits, -1)
    return jnp.mean(jnp.sum(jnp.exp(logp) * (logp - logq), -1))


def train_adapter(
    proposer: KangarooProposer,
    target_cfg: ModelConfig,
    tparams: Params,
    adapter: Params,
    batches: Iterable[jax.Array],
    learning_rate: float = 1e-3,
) -> tuple[Params, list[float]]:
    """Distil the adapter on token batches ``[B, T]`` (the target frozen) with
    Adam; returns the trained adapter and the loss per step."""
    opt = optax.adam(learning_rate)
    state = opt.init(adapter)

    @jax.jit
    def step(adapter, state, tokens, tparams):  # tparams an argument: never baked in as constants
        loss, g = jax.value_and_grad(lambda a: distill_loss(proposer, target_cfg, tparams, a, tokens))(adapter)
        upd, state = opt.update(g, state, adapter)
        return optax.apply_updates(adapter, upd), state, loss

    losses = []
    for tokens in batches:
        adapter, state, loss = step(adapter, state, jnp.asarray(tokens), tparams)
        losses.append(float(loss))
    return adapter, losses
