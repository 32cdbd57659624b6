"""Attention with a general boolean mask, behind one dispatch point.

``reference`` is the einsum oracle that every kernel is tested against.
``flash`` is the Pallas kernel. ``ring`` is sequence-parallel ring attention
(Liu, Zaharia & Abbeel 2023) under ``jax.shard_map`` over the ``sequence``
axis of the ambient mesh (see ``ring_attend``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

NEG_INF = -1e30  # finite, so fully masked rows give a uniform (then zeroed) softmax, not NaN


def _softmax_attention(q, parts, scale: float) -> jax.Array:
    """softmax attention of ``q [B, T, H, Dh]`` over the concatenated key sets ``parts``: a list
    of ``(k, v [B, S_i, KVH, Dh], mask [B, T, S_i] bool)``, one softmax over all of them, with
    grouped-query heads (query head h reads KV head h // (H // KVH)); softmax in float32."""
    B, T, H, Dh = q.shape
    KVH = parts[0][0].shape[2]
    qg = q.reshape(B, T, KVH, H // KVH, Dh)
    s = jnp.concatenate([jnp.where(m[:, None, None], jnp.einsum("btkgd,bskd->bkgts", qg, k,
                                                                  preferred_element_type=jnp.float32) * scale, NEG_INF)
                         for k, _, m in parts], axis=-1)
    p = jax.nn.softmax(s, axis=-1)
    # A query that sees nothing (padding) outputs zeros instead of a mean of V.
    seen = jnp.stack([m.any(-1) for _, _, m in parts]).any(0)
    p = jnp.where(seen[:, None, None, :, None], p, 0.0)
    o, at = 0.0, 0
    for _, v, _ in parts:
        S = v.shape[1]
        o = o + jnp.einsum("bkgts,bskd->btkgd", p[..., at:at + S].astype(v.dtype), v, preferred_element_type=jnp.float32)
        at += S
    return o.reshape(B, T, H, Dh).astype(q.dtype)


def reference_attention(
    q: jax.Array,  # [B, T, H, Dh]
    k: jax.Array,  # [B, S, KVH, Dh]
    v: jax.Array,  # [B, S, KVH, Dh]
    mask: jax.Array,  # [B, T, S] bool
    scale: float,
) -> jax.Array:  # [B, T, H, Dh]
    """softmax(q k^T * scale + mask) v with grouped-query heads (query head h
    reads KV head h // (H // KVH)); softmax in float32."""
    return _softmax_attention(q, [(k, v, mask)], scale)


def attend_cache_and_block(q, cache_k, cache_v, cache_pos, k, v, q_pos, window, scale, block_mask=None):
    """Attention of ``T`` new queries over a read-only cache (``cache_k/v [B, S, KVH, Dh]``,
    slot positions ``cache_pos [B, S]``) plus the block's own keys ``k, v [B, T, KVH, Dh]``
    (at ``q_pos``; ``block_mask [B, T, T]`` restricts which new tokens see each other, e.g. a
    token tree), as if the block had been written to the cache first: one softmax over
    both key sets, each with ``dense_mask``'s rules. -> ``[B, T, H, Dh]``."""
    return _softmax_attention(q, [(cache_k, cache_v, dense_mask(q_pos, cache_pos, window)),
                                  (k, v, dense_mask(q_pos, q_pos, window, extra=block_mask))], scale)


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
    ``ring``: ``ring_attend`` (self-attention within the given tokens, the
    sequence split over the ambient mesh's ``sequence`` axis); it falls back
    to the reference path when there is no such axis of size > 1.
    """
    if impl == "flash" and extra_mask is None:
        from tokax.kernels.flash_attention import flash_attention_with_lse

        qs, ks = _padding_segments(q_pos, kv_pos, q_seg, kv_seg)
        out, _ = flash_attention_with_lse(
            q, k, v, causal=True, window=window, segment_ids=qs, kv_segment_ids=ks,
            q_positions=q_pos, kv_positions=kv_pos, scale=scale,
        )
        return out.astype(q.dtype)
    if impl == "ring":
        if extra_mask is not None:
            raise ValueError(
                "attention_impl='ring' takes no extra (token-tree) mask; ring attention is for "
                "cache-free training / scoring calls (the decoder uses 'reference' with a cache)"
            )
        if sequence_parallel_size() > 1:
            return ring_attend(q, k, v, scale, q_pos, kv_pos, window, q_seg, kv_seg)
        impl = "reference"  # one device along the sequence: nothing to ring over
    if impl in ("reference", "flash"):
        return reference_attention(q, k, v, dense_mask(q_pos, kv_pos, window, q_seg, kv_seg, extra_mask), scale)
    raise ValueError(f"attention_impl={impl!r}: use 'reference', 'flash' or 'ring'")


# ----------------------------------------------------------------------------
# ring attention inside the model

SEQUENCE_AXIS = "sequence"  # the mesh axis the sequence is split over (tokax.train.sharding.MESH_AXES)
_BATCH_AXES = ("data", "fsdp")  # mesh axes that may split the batch inside the ring's shard_map
_HEAD_AXES = ("tensor",)  # mesh axes that may split the heads
_RING_BLOCK = 512  # inner flash chunk of the ring kernel (scores memory is O(L x block))


def _padding_segments(q_pos, kv_pos, q_seg, kv_seg):
    """Segment ids that also encode ``dense_mask``'s padding rules for kernels that
    mask by segment: padding queries (-1) and empty key slots (-2) get segments no
    real token has, so no real query sees them and a padding query sees nothing."""
    qs = jnp.zeros_like(q_pos) if q_seg is None else q_seg
    ks = jnp.zeros_like(kv_pos) if kv_seg is None else kv_seg
    return jnp.where(q_pos >= 0, qs, -1), jnp.where(kv_pos >= 0, ks, -2)


def _mesh_size(mesh, axis: str) -> int:
    return int(mesh.shape[axis]) if axis in mesh.axis_names else 1


def sequence_parallel_size() -> int:
    """Size of the ``sequence`` axis of the ambient (abstract) mesh, 1 without one.

    The ambient mesh is the one set by ``jax.set_mesh(mesh)`` around the call
    that traces the model (outside ``jit``), or by
    ``jax.sharding.use_abstract_mesh(mesh.abstract_mesh)`` while tracing
    (inside ``jit``); ``tokax.train.sharding.mesh_context`` picks the right one.
    """
    return _mesh_size(jax.sharding.get_abstract_mesh(), SEQUENCE_AXIS)


def _split_axes(mesh, candidates: tuple[str, ...], *dims: int) -> tuple[str, ...]:
    """The mesh axes among ``candidates`` (size > 1, not already manual) whose
    product divides every one of ``dims``; greedy in order, others replicate."""
    manual = set(getattr(mesh, "manual_axes", ()))
    out: list[str] = []
    prod = 1
    for a in candidates:
        n = _mesh_size(mesh, a)
        if n > 1 and a not in manual and all(d % (prod * n) == 0 for d in dims):
            out.append(a)
            prod *= n
    return tuple(out)


def _spec_entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def ring_attend(
    q: jax.Array,  # [B, T, H, Dh], tokens in any sequence layout
    k: jax.Array,  # [B, T, KVH, Dh]
    v: jax.Array,  # [B, T, KVH, Dh]
    scale: float,
    q_pos: jax.Array,  # [B, T] int, natural positions (-1 = padding)
    kv_pos: jax.Array,  # [B, T] int
    window: int | None,
    q_seg: jax.Array | None = None,  # [B, T] int
    kv_seg: jax.Array | None = None,  # [B, T] int
) -> jax.Array:  # [B, T, H, Dh]
    """Causal self-attention with the token axis split over the ambient mesh's
    ``sequence`` axis (n devices), computed by ring attention:

        O_i = sum_j softmax_j(scale q_i . k_j + M_ij) v_j,
        M_ij = 0 if kv_pos_j <= q_pos_i, q_pos_i - W < kv_pos_j (local layers),
               seg_i == seg_j, both real; -inf otherwise,

    with device d holding tokens [d T/n, (d+1) T/n) of the arrays as given and
    the K/V blocks (with their positions and segment ids) circulating around
    the ring (``tokax.kernels.ring_attention.ring_attention_shard``, custom VJP).
    The mask comes from the positions, not the slot order, so the tokens may
    be in any layout (plain, striped, zigzag: ``to_layout`` on every per-token
    array, positions included) and the result equals ``reference_attention``
    on the same arrays. Batch splits over ``data``/``fsdp`` and heads over
    ``tensor`` where those axes divide them; other axes replicate.

    Inside a ``shard_map`` that already made ``sequence`` manual, the arrays are
    the local block and the kernel is called directly.
    """
    from tokax.kernels.ring_attention import ring_attention_shard

    mesh = jax.sharding.get_abstract_mesh()
    n = _mesh_size(mesh, SEQUENCE_AXIS)
    B, T, H, _ = q.shape
    KVH = k.shape[2]
    if k.shape[1] != T:
        raise ValueError(
            f"attention_impl='ring' is self-attention over the given tokens: q has {T} tokens, k has {k.shape[1]}"
        )
    qs, ks = _padding_segments(q_pos, kv_pos, q_seg, kv_seg)
    q_pos, kv_pos = q_pos.astype(jnp.int32), kv_pos.astype(jnp.int32)

    def per_shard(q, k, v, qp, kp, qs, ks):
        L = q.shape[1]
        # A chunk that divides L/2 never straddles the two halves of a zigzag
        # shard, so the masked half of each off-diagonal block is skipped.
        half = L // 2 if L % 2 == 0 else L
        block = max(c for c in range(1, min(half, _RING_BLOCK) + 1) if half % c == 0)
        return ring_attention_shard(
            q, k, v, qp, kp, axis_name=SEQUENCE_AXIS, causal=True, window=window, scale=scale,
            q_segment_ids=qs, kv_segment_ids=ks, impl="ring", block_size=block,
        )

    if SEQUENCE_AXIS in set(getattr(mesh, "manual_axes", ())):
        return per_shard(q, k, v, q_pos, kv_pos, qs, ks)
    if T % n:
        raise ValueError(
            f"attention_impl='ring': the sequence length {T} must be divisible by the mesh's "
            f"'{SEQUENCE_AXIS}' axis size {n}; pad the batch to a multiple of {n}"
        )
    batch = _spec_entry(_split_axes(mesh, _BATCH_AXES, B))
    heads = _spec_entry(_split_axes(mesh, _HEAD_AXES, H, KVH))
    # Contiguous head splits keep GQA groups together: query head h reads KV
    # head h // (H / KVH), and both splits cut at multiples of H / t, KVH / t.
    x_spec = P(batch, SEQUENCE_AXIS, heads, None)
    t_spec = P(batch, SEQUENCE_AXIS)
    return jax.shard_map(
        per_shard,
        mesh=mesh,
        in_specs=(x_spec, x_spec, x_spec, t_spec, t_spec, t_spec, t_spec),
        out_specs=x_spec,
    )(q, k, v, q_pos, kv_pos, qs, ks)
