"""Attention with a general boolean mask, behind one dispatch point.

``reference`` is the einsum oracle that every kernel is tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so fully masked rows give a uniform (then zeroed) softmax, not NaN


def reference_attention(
    q: jax.Array,  # [B, T, H, Dh]
    k: jax.Array,  # [B, S, KVH, Dh]
    v: jax.Array,  # [B, S, KVH, Dh]
    mask: jax.Array,  # [B, T, S] bool
    scale: float,
) -> jax.Array:  # [B, T, H, Dh]
    """softmax(q k^T * scale + mask) v with grouped-query heads (query head h
    reads KV head h // (H // KVH)); softmax in float32."""
    B, T, H, Dh = q.shape
    KVH = k.shape[2]
    G = H // KVH
    qg = q.reshape(B, T, KVH, G, Dh)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask[:, None, None, :, :], s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1)
    # A query that sees nothing (padding) outputs zeros instead of a mean of V.
    p = jnp.where(mask.any(-1)[:, None, None, :, None], p, 0.0)
    o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(B, T, H, Dh).astype(q.dtype)


def attend(impl: str, q, k, v, mask, scale):
    """Dispatch on ``ModelConfig.attention_impl``."""
    if impl == "reference":
        return reference_attention(q, k, v, mask, scale)
    raise NotImplementedError(
        f"attention_impl={impl!r} is not wired into the decoder yet; use 'reference'"
    )
