"""Reference attention and log-probs: the oracle every kernel is tested against.

Plain einsums over the whole score matrix, float32 softmax, no tiling.
Attention is

    O = softmax(scale * Q K^T + M) V,      M_ij = 0 if mask_ij else -inf,

with the convention that a query row whose mask is all False outputs zeros
(and log-sum-exp -inf), which is what the kernels return for such rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(
    q_positions: jax.Array,  # [B, Tq] int
    kv_positions: jax.Array,  # [B, Tk] int
    *,
    causal: bool = True,
    window: int | None = None,
    q_segment_ids: jax.Array | None = None,  # [B, Tq] int
    kv_segment_ids: jax.Array | None = None,  # [B, Tk] int
) -> jax.Array:
    """Boolean mask [B, Tq, Tk]: query i sees key j.

    causal: kv_pos <= q_pos. window=W: q_pos - W < kv_pos (and, when not
    causal, kv_pos < q_pos + W). Segment ids: equal ids only.
    """
    qp = q_positions[:, :, None]
    kp = kv_positions[:, None, :]
    mask = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), bool)
    if causal:
        mask &= kp <= qp
    if window is not None:
        mask &= qp - kp < window
        if not causal:
            mask &= kp - qp < window
    if q_segment_ids is not None:
        kv_seg = q_segment_ids if kv_segment_ids is None else kv_segment_ids
        mask &= q_segment_ids[:, :, None] == kv_seg[:, None, :]
    return mask


def attention_with_lse(
    q: jax.Array,  # [B, Tq, H, D]
    k: jax.Array,  # [B, Tk, KVH, D]
    v: jax.Array,  # [B, Tk, KVH, D]
    mask: jax.Array,  # [B, Tq, Tk] or [B, H, Tq, Tk] bool
    *,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Masked softmax attention; returns (out [B, Tq, H, D], lse [B, H, Tq]).

    Grouped-query: query head h reads kv head h // (H // KVH).
    """
    h, kvh = q.shape[2], k.shape[2]
    if h % kvh:
        raise ValueError(f"q heads ({h}) must be a multiple of kv heads ({kvh})")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = jnp.repeat(k, h // kvh, axis=2)
    v = jnp.repeat(v, h // kvh, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    if mask.ndim == 3:
        mask = mask[:, None]
    s = jnp.where(mask, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)  # [B, H, Tq], -inf on empty rows
    # Empty rows: exp(-inf - 0) = 0 everywhere -> zero output, no NaN.
    p = jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
    out = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32))
    return out.astype(q.dtype), lse


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float | None = None
) -> jax.Array:
    """`attention_with_lse` without the log-sum-exp: [B, Tq, H, D]."""
    return attention_with_lse(q, k, v, mask, scale=scale)[0]


def logprobs(
    hidden: jax.Array,  # [B, T, D]
    embedding: jax.Array,  # [V, D]
    targets: jax.Array,  # [B, T] int
) -> jax.Array:
    """log softmax(hidden @ embedding^T)[targets] with full logits: [B, T] float32."""
    logits = jnp.einsum("btd,vd->btv", hidden, embedding, preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
