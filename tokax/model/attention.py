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


def dense_mask(q_pos, kv_pos, window, q_seg=None, kv_seg=None, extra=None):
    """``[B, T, S]`` visibility: causal by position (``kv <= q``), key slot
    filled (``kv >= 0``), query real (``q >= 0``), within the sliding window
    (``q - window < kv``), same segment, and an optional extra mask."""
    qp = q_pos[:, :, None]
    kp = kv_pos[:, None, :]
    m = (kp <= qp) & (kp >= 0) & (qp >= 0)
    if window is not None:
        m = m & (kp > qp - window)
    if q_seg is not None:
        m = m & (q_seg[:, :, None] == kv_seg[:, None, :])
    if extra is not None:
        m = m & extra
    return m


def attend(impl: str, q, k, v, scale, q_pos, kv_pos, window, q_seg=None, kv_seg=None, extra_mask=None):
    """Attention of queries at ``q_pos [B, T]`` over keys at ``kv_pos [B, S]``
    (-1 = padding / empty slot), dispatched on ``ModelConfig.attention_impl``.

    ``reference``: the einsum oracle with a dense mask. ``flash``: the Pallas
    kernel (interpret mode on CPU), which takes positions and segment ids
    instead of a dense mask; a token-tree ``extra_mask`` is not expressible
    that way, so such calls (tree verification) use the reference path.
    """
    if impl == "flash" and extra_mask is None:
        from tokax.kernels.flash_attention import flash_attention_with_lse

        # Empty slots / padding get their own segment so no real query sees them.
        qs = jnp.zeros_like(q_pos) if q_seg is None else q_seg
        ks = jnp.zeros_like(kv_pos) if kv_seg is None else kv_seg
        qs = jnp.where(q_pos >= 0, qs, -1)
        ks = jnp.where(kv_pos >= 0, ks, -2)
        out, _ = flash_attention_with_lse(
            q, k, v, causal=True, window=window, segment_ids=qs, kv_segment_ids=ks,
            q_positions=q_pos, kv_positions=kv_pos, scale=scale,
        )
        return out.astype(q.dtype)
    if impl in ("reference", "flash"):
        return reference_attention(q, k, v, dense_mask(q_pos, kv_pos, window, q_seg, kv_seg, extra_mask), scale)
    raise NotImplementedError(
        f"attention_impl={impl!r} is not wired into the decoder; use 'reference' or 'flash'"
    )
