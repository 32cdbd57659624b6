"""Tree attention for speculative verification, and shared-prefix attention.

Token-tree verification (SpecInfer; Miao et al. 2024): the T nodes of a
draft tree are scored in one target pass. Node t attends to the valid
cache entries and to its ancestors-or-self in the tree:

    O_t = softmax_j(scale * q_t . k_j + M_tj) v_j,  j in [cache ; tree],
    M_tj = 0 if (j in cache and cache_mask_j) or (j in tree and tree_mask_tj)
           else -inf.

`tree_attention` is one Pallas kernel: per (batch row, kv head) program the
G query heads of the group are folded with the T nodes into G*T rows (one
K/V read serves the whole group, the decode-time bottleneck), the cache is
streamed in tiles with an online softmax (tiles past the last valid entry
are skipped), and the tree tile with its mask is the final step.

Shared-prefix attention (Hydragen; Juravsky et al. 2024): when all batch
rows share one prompt, attention over [prefix ; suffix_b] splits exactly
into two softmaxes merged by their log-sum-exps,

    O = (e^{lse_p} O_p + e^{lse_s} O_s) / (e^{lse_p} + e^{lse_s}),

and the prefix part runs with the queries of all rows stacked into one
row, so the prefix K/V is read once for the batch and the product becomes
a matrix-matrix multiply.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from tokax.kernels.flash_attention import (
    _MASKED,
    _finalize,
    _fwd_tile,
    _pad_axis,
    _round_up,
    flash_attention_with_lse,
    resolve_backend,
)


def merge_attention(
    o1: jax.Array,  # [B, T, H, D]
    lse1: jax.Array,  # [B, H, T]
    o2: jax.Array,  # [B, T, H, D]
    lse2: jax.Array,  # [B, H, T]
) -> tuple[jax.Array, jax.Array]:
    """Attention over the union of two disjoint key sets from its two halves.

    O = (e^{lse1} O1 + e^{lse2} O2) / (e^{lse1} + e^{lse2}),
    lse = log(e^{lse1} + e^{lse2}); rows empty in both give zeros / -inf.
    """
    m = jnp.maximum(lse1, lse2)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w1, w2 = jnp.exp(lse1 - m), jnp.exp(lse2 - m)  # [B, H, T]
    den = w1 + w2
    safe = jnp.where(den == 0.0, 1.0, den)
    to_bthd = lambda w: jnp.transpose(w / safe, (0, 2, 1))[..., None]  # noqa: E731
    o = to_bthd(w1) * o1.astype(jnp.float32) + to_bthd(w2) * o2.astype(jnp.float32)
    lse = jnp.where(den == 0.0, -jnp.inf, m + jnp.log(safe))
    return o.astype(o1.dtype), lse


# ----------------------------------------------------------------------------
# Tree attention kernel.


def _tree_kernel(lo_ref, hi_ref, q_ref, ck_ref, cv_ref, cm_ref, tk_ref, tv_ref, tm_ref, o_ref,
                 *, scale: float, block_k: int):
    q = q_ref[...]  # [R, D]: rows are (node, head-in-group)

    def body(j, carry):
        sl = pl.ds(j * block_k, block_k)
        mask = jnp.broadcast_to((cm_ref[sl] != 0)[None, :], (q.shape[0], block_k))
        return _fwd_tile(q, ck_ref[sl, :], cv_ref[sl, :], mask, *carry, scale)

    init = (jnp.full((q.shape[0], 1), _MASKED, jnp.float32),
            jnp.zeros((q.shape[0], 1), jnp.float32), jnp.zeros(q.shape, jnp.float32))
    carry = lax.fori_loop(lo_ref[()], hi_ref[()] + 1, body, init)
    carry = _fwd_tile(q, tk_ref[...], tv_ref[...], tm_ref[...] != 0, *carry, scale)
    o_ref[...] = _finalize(*carry)[0].astype(o_ref.dtype)


def _tree_attention_composed(q, cache_k, cache_v, cache_mask, tree_k, tree_v, tree_mask,
                             scale, backend, interpret):
    """Cache part by flash attention (validity as segment ids), tree part dense, merged."""
    b, t = q.shape[:2]
    o1, lse1 = flash_attention_with_lse(
        q, cache_k, cache_v, causal=False, scale=scale,
        segment_ids=jnp.zeros((b, t), jnp.int32),
        kv_segment_ids=jnp.where(cache_mask, 0, 1).astype(jnp.int32),
        backend=backend, interpret=interpret)
    h, kvh = q.shape[2], tree_k.shape[2]
    tk = jnp.repeat(tree_k, h // kvh, axis=2).astype(jnp.float32)
    tv = jnp.repeat(tree_v, h // kvh, axis=2).astype(jnp.float32)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), tk) * scale
    s = jnp.where(tree_mask[:, None], s, -jnp.inf)
    lse2 = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - jnp.where(jnp.isfinite(lse2), lse2, 0.0)[..., None])
    o2 = jnp.einsum("bhqk,bkhd->bqhd", p, tv)
    return merge_attention(o1, lse1, o2, lse2)[0].astype(q.dtype)


def tree_attention(
    q: jax.Array,  # [B, T, H, D] queries of the T tree nodes
    cache_k: jax.Array,  # [B, S, KVH, D]
    cache_v: jax.Array,  # [B, S, KVH, D]
    tree_k: jax.Array,  # [B, T, KVH, D]
    tree_v: jax.Array,  # [B, T, KVH, D]
    tree_mask: jax.Array,  # [B, T, T] bool, node t sees node u (ancestor-or-self)
    *,
    cache_mask: jax.Array | None = None,  # [B, S] bool, valid cache entries
    cache_lengths: jax.Array | None = None,  # [B] int, entries [0, len) valid
    scale: float | None = None,
    block_k: int | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Attention of tree-node queries over [valid cache ; tree]: [B, T, H, D].

    Give the cache validity as `cache_mask` or `cache_lengths` (neither: all
    valid). Inference only (no custom gradient). On TPU the kernel is
    replaced by flash attention over the cache merged with a dense tree part.
    """
    b, t, h, d = q.shape
    s, kvh = cache_k.shape[1], cache_k.shape[2]
    if h % kvh:
        raise ValueError(f"q heads ({h}) must be a multiple of kv heads ({kvh})")
    if cache_v.shape != cache_k.shape or tree_k.shape != (b, t, kvh, d) or tree_v.shape != tree_k.shape:
        raise ValueError(f"shape mismatch: q {q.shape}, cache_k/v {cache_k.shape}/{cache_v.shape}, "
                         f"tree_k/v {tree_k.shape}/{tree_v.shape} (want tree [B, T, KVH, D])")
    if tree_mask.shape != (b, t, t):
        raise ValueError(f"tree_mask must be [B={b}, T={t}, T={t}], got {tree_mask.shape}")
    if cache_mask is not None and cache_lengths is not None:
        raise ValueError("give cache_mask or cache_lengths, not both")
    if cache_lengths is not None:
        cache_mask = jnp.arange(s)[None, :] < jnp.asarray(cache_lengths)[:, None]
    if cache_mask is None:
        cache_mask = jnp.ones((b, s), bool)
    if cache_mask.shape != (b, s):
        raise ValueError(f"cache_mask must be [B={b}, S={s}], got {cache_mask.shape}")
    backend, interpret = resolve_backend(backend, interpret)
    scale = float(d ** -0.5 if scale is None else scale)
    if backend == "tpu":
        return _tree_attention_composed(q, cache_k, cache_v, cache_mask, tree_k, tree_v,
                                        tree_mask.astype(bool), scale, backend, interpret)

    g = h // kvh
    bk = block_k or min(128, max(16, pl.next_power_of_2(s)))
    s_p = _round_up(s, bk)
    r = max(16, pl.next_power_of_2(t * g))  # folded rows, a Triton tile
    t_p = max(16, pl.next_power_of_2(t))
    d_p = pl.next_power_of_2(d)
    # Fold the group: row t*G + j holds node t, head kvh*G + j.
    qf = q.reshape(b, t, kvh, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kvh, t * g, d)
    qf = _pad_axis(_pad_axis(qf, 2, r), 3, d_p)  # [B, KVH, R, Dp]
    tm = jnp.repeat(tree_mask.astype(jnp.int32), g, axis=1)  # [B, T*G, T]
    tm = _pad_axis(_pad_axis(tm, 1, r), 2, t_p)  # [B, R, Tp]
    cm = _pad_axis(cache_mask.astype(jnp.int32), 1, s_p)  # [B, Sp]
    pad_kv = lambda x, n: _pad_axis(_pad_axis(x, 1, n), 3, d_p)  # noqa: E731
    # Valid-tile range per row: skip tiles before the first / after the last valid entry.
    tiles = cm.reshape(b, -1, bk).any(-1)  # [B, nk]
    nk = tiles.shape[1]
    anyv = tiles.any(-1)
    lo = jnp.where(anyv, jnp.argmax(tiles, -1), 0).astype(jnp.int32)
    hi = jnp.where(anyv, nk - 1 - jnp.argmax(tiles[:, ::-1], -1), -1).astype(jnp.int32)

    kv_all = pl.BlockSpec((None, s_p, None, d_p), lambda bi, gi: (bi, 0, gi, 0))
    tree_all = pl.BlockSpec((None, t_p, None, d_p), lambda bi, gi: (bi, 0, gi, 0))
    out = pl.pallas_call(
        functools.partial(_tree_kernel, scale=scale, block_k=bk),
        grid=(b, kvh),
        in_specs=[
            pl.BlockSpec((None,), lambda bi, gi: (bi,)), pl.BlockSpec((None,), lambda bi, gi: (bi,)),
            pl.BlockSpec((None, None, r, d_p), lambda bi, gi: (bi, gi, 0, 0)),
            kv_all, kv_all, pl.BlockSpec((None, s_p), lambda bi, gi: (bi, 0)),
            tree_all, tree_all, pl.BlockSpec((None, r, t_p), lambda bi, gi: (bi, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, r, d_p), lambda bi, gi: (bi, gi, 0, 0)),
        out_shape=jax.ShapeDtypeStruct(qf.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="tree_attention",
    )(lo, hi, qf, pad_kv(cache_k, s_p), pad_kv(cache_v, s_p), cm,
      pad_kv(tree_k, t_p), pad_kv(tree_v, t_p), tm)
    out = out[:, :, : t * g, :d].reshape(b, kvh, t, g, d).transpose(0, 2, 1, 3, 4)
    return out.reshape(b, t, h, d)


# ----------------------------------------------------------------------------
# Hydragen shared-prefix attention.


def shared_prefix_attention(
    q: jax.Array,  # [B, T, H, D]
    prefix_k: jax.Array,  # [P, KVH, D] shared by every row
    prefix_v: jax.Array,  # [P, KVH, D]
    suffix_k: jax.Array,  # [B, S, KVH, D]
    suffix_v: jax.Array,  # [B, S, KVH, D]
    *,
    suffix_lengths: jax.Array | None = None,  # [B] int, suffix entries [0, len) valid
    q_positions: jax.Array | None = None,  # [B, T] absolute; default P + S - T + arange(T)
    causal: bool = True,
    scale: float | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Attention over [shared prefix ; own suffix] per row, Hydragen-style: [B, T, H, D].

    Key positions are 0..P-1 for the prefix and P..P+S-1 for the suffix;
    with `causal`, a query at position i sees keys at positions <= i.
    Differentiable (the log-sum-exps carry gradients).
    """
    b, t, h, d = q.shape
    p_len, kvh = prefix_k.shape[0], prefix_k.shape[1]
    s = suffix_k.shape[1]
    if prefix_k.shape != (p_len, kvh, d) or prefix_v.shape != prefix_k.shape:
        raise ValueError(f"prefix_k/v must be [P, KVH, D={d}], got {prefix_k.shape}/{prefix_v.shape}")
    if suffix_k.shape != (b, s, kvh, d) or suffix_v.shape != suffix_k.shape:
        raise ValueError(f"suffix_k/v must be [B={b}, S, KVH={kvh}, D={d}], got "
                         f"{suffix_k.shape}/{suffix_v.shape}")
    if q_positions is None:
        q_positions = jnp.broadcast_to(p_len + s - t + jnp.arange(t, dtype=jnp.int32), (b, t))
    q_positions = jnp.asarray(q_positions, jnp.int32)
    kw = dict(causal=causal, scale=scale, backend=backend, interpret=interpret)

    # Prefix: every row's queries stacked into one batch row of B*T queries.
    o_p, lse_p = flash_attention_with_lse(
        q.reshape(1, b * t, h, d), prefix_k[None], prefix_v[None],
        q_positions=q_positions.reshape(1, b * t),
        kv_positions=jnp.arange(p_len, dtype=jnp.int32)[None], **kw)
    o_p = o_p.reshape(b, t, h, d)
    lse_p = lse_p.reshape(h, b, t).transpose(1, 0, 2)  # [B, H, T]

    # Suffix: per row, invalid tail entries get a segment id no query has.
    kv_seg = None
    if suffix_lengths is not None:
        kv_seg = (jnp.arange(s)[None, :] >= jnp.asarray(suffix_lengths)[:, None]).astype(jnp.int32)
    o_s, lse_s = flash_attention_with_lse(
        q, suffix_k, suffix_v, q_positions=q_positions,
        kv_positions=jnp.broadcast_to(p_len + jnp.arange(s, dtype=jnp.int32), (b, s)),
        segment_ids=None if kv_seg is None else jnp.zeros((b, t), jnp.int32),
        kv_segment_ids=kv_seg, **kw)
    return merge_attention(o_p, lse_p, o_s, lse_s)[0]
