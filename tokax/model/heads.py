"""Blockwise / Medusa-1 prediction heads on a frozen target's hidden state.

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
