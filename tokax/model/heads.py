"""Output heads beside a decoder's own tied LM head.

* Blockwise / Medusa-1 prediction heads on a frozen target's hidden state (below).
* A head over a token subset (``subset_head_params``): a draft whose LM head covers only
  the most frequent tokens; ``head_logits`` applies either kind of head.

Blockwise / Medusa-1 heads:

Head ``i`` (1..k) reads the target's final-normed hidden state ``h_t`` (the
state after token ``t``) and predicts token ``t+1+i``:

    f_i = h_t + SiLU(W_i h_t + b_i)          logits_i = E f_i

with ``E`` the target's tied embedding (its LM head). This module holds the
formula and its initialisation only, so that decoding
(``tokax.decode.proposers.blockwise``) and training (``tokax.train.heads``)
share one definition without either importing the other.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Params = Any

# Logit of the tokens outside a subset head: exp(NEG - max) is exactly 0 in float32, so q = 0
# there, without the inf - inf = nan that -inf could produce in downstream arithmetic.
NEG_LOGIT = -1e30


def is_subset_head(p: Any) -> bool:
    """Whether params ``p`` carry a head over a token subset (``subset_head_params``)
    instead of the tied full-vocabulary head."""
    return isinstance(p, dict) and "head_ids" in p


def subset_head_params(decoder_params: Params, head_ids: jax.Array) -> dict:
    """Params whose output head covers only ``head_ids [S]`` (sorted, distinct): their rows of
    the tied embedding, gathered once here so that a step costs ``S`` instead of ``V`` dot
    products. The distribution is the full head's conditioned on the subset, q(v) = 0 for v
    outside it (speculative sampling stays exact for any q)."""
    ids = jnp.asarray(head_ids, jnp.int32)
    return {"decoder": decoder_params, "head_ids": ids, "head_w": jnp.take(decoder_params["embed"], ids, axis=0)}


def decoder_of(p: Any) -> Params:
    """The decoder params inside ``p`` (``p`` itself unless it carries a subset head)."""
    return p["decoder"] if is_subset_head(p) else p


def subset_logits(p: dict, hidden: jax.Array, vocab_size: int) -> jax.Array:
    """Logits ``[..., V]`` float32 of a subset head: ``NEG_LOGIT`` outside the subset."""
    sub = jnp.einsum("...d,sd->...s", hidden, p["head_w"].astype(hidden.dtype), preferred_element_type=jnp.float32)
    full = jnp.full((*hidden.shape[:-1], vocab_size), NEG_LOGIT, jnp.float32)
    return full.at[..., p["head_ids"]].set(sub)


def init_heads(d_model: int, k: int, rng: jax.Array | None = None, scale: float = 0.0) -> Params:
    """Params of ``k`` heads: ``{"w": [k, D, D], "b": [k, D]}`` float32.
    ``scale = 0`` (default) is Medusa's init: ``W = 0``, each head equals the
    target's next-token head. ``scale > 0`` draws ``W ~ N(0, scale^2 / D)``
    (tests: heads that disagree with each other and with the target)."""
    if k < 1:
        raise ValueError(f"blockwise heads: k={k} must be >= 1")
    w = jnp.zeros((k, d_model, d_model), jnp.float32)
    if scale > 0.0:
        if rng is None:
            raise ValueError("init_heads(scale > 0) needs an rng")
        w = jax.random.normal(rng, (k, d_model, d_model), jnp.float32) * (scale * d_model**-0.5)
    return {"w": w, "b": jnp.zeros((k, d_model), jnp.float32)}


def apply_heads(hparams: Params, hidden: jax.Array) -> jax.Array:
    """Head features ``f_i = h + SiLU(W_i h + b_i)``: ``hidden [..., D]`` ->
    ``[..., k, D]`` float32 (unembed with the target's embedding for logits)."""
    h = hidden.astype(jnp.float32)
    z = jnp.einsum("...d,kde->...ke", h, hparams["w"]) + hparams["b"]  # [..., k, D]
    return h[..., None, :] + jax.nn.silu(z)
