"""Explicit KV cache: a pytree passed into the decoder and returned by it.

Layout: one K and one V array per layer, ``[B, S, KVH, Dh]``, plus per-slot
position ids ``pos [B, S]`` (-1 marks an empty slot) and ``length [B]``, the
next slot each row writes to. Attention masks come from ``pos``, never from
slot indices, so rows may hold holes (right-padded prompts, rolled-back
drafts) and a speculative method can

* write several positions at once (``Decoder`` writes ``T`` new slots per call),
* roll back to a shorter length (chains: the accepted drafts are a prefix), and
* compact a just-written block to a chosen subset of its slots (trees: the
  accepted path is scattered through the block).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from tokax.errors import ContextTooLong
from tokax.model.config import ModelConfig


@struct.dataclass
class KVCache:
    k: tuple  # n_layers x [B, S, KVH, Dh]
    v: tuple  # n_layers x [B, S, KVH, Dh]
    pos: jax.Array  # [B, S] int32 position id held by each slot, -1 = empty
    length: jax.Array  # [B] int32 next slot to write

    @property
    def max_len(self) -> int:
        return self.pos.shape[1]

    @property
    def batch(self) -> int:
        return self.pos.shape[0]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache for ``batch`` rows of ``max_len`` slots."""
    if max_len > cfg.max_seq_len:
        raise ContextTooLong(
            f"cache max_len={max_len} exceeds ModelConfig.max_seq_len={cfg.max_seq_len}; "
            "shorten the prompt or max_new_tokens"
        )
    dtype = dtype or cfg.jnp_dtype
    shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
    return KVCache(
        k=zeros,
        v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
        pos=jnp.full((batch, max_len), -1, jnp.int32),
        length=jnp.zeros((batch,), jnp.int32),
    )


def _write_rows(buf: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """buf[b, start[b]:start[b]+T] = new[b] for every row b."""

    def one(b, n, s):
        idx = (s,) + (0,) * (b.ndim - 1)
        return jax.lax.dynamic_update_slice(b, n.astype(b.dtype), idx)

    return jax.vmap(one)(buf, new, start)


def write_positions(cache: KVCache, positions: jax.Array) -> KVCache:
    """Record the position ids of ``T`` new slots (written at ``length``)."""
    return cache.replace(pos=_write_rows(cache.pos, positions.astype(jnp.int32), cache.length))


def write_layer(cache: KVCache, layer: int, k: jax.Array, v: jax.Array) -> KVCache:
    """Write new K/V ``[B, T, KVH, Dh]`` for one layer at slots ``length .. length+T``."""
    ks = list(cache.k)
    vs = list(cache.v)
    ks[layer] = _write_rows(cache.k[layer], k, cache.length)
    vs[layer] = _write_rows(cache.v[layer], v, cache.length)
    return cache.replace(k=tuple(ks), v=tuple(vs))


@struct.dataclass
class BlockKV:
    """K/V of ``T`` new tokens computed against a cache without writing it
    (``forward(..., write_cache=False)``); ``write_block`` stores them."""

    k: tuple  # n_layers x [B, T, KVH, Dh]
    v: tuple  # n_layers x [B, T, KVH, Dh]
    positions: jax.Array  # [B, T] (-1: padding, never attended)

    def pad_to(self, T: int) -> "BlockKV":
        """The block padded with empty (position -1) slots to ``T`` tokens."""
        n = self.positions.shape[1]
        pad = lambda x: jnp.pad(x, ((0, 0), (0, T - n)) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
        return BlockKV(k=tuple(pad(x) for x in self.k), v=tuple(pad(x) for x in self.v),
                       positions=jnp.pad(self.positions, ((0, 0), (0, T - n)), constant_values=-1))


def write_block(cache: KVCache, blk: BlockKV) -> KVCache:
    """Write ``blk`` at each row's ``length`` and advance by its ``T`` slots: the cache a
    writing ``forward`` of the same tokens returns. Inside a ``lax.cond`` / ``switch`` a
    forward that writes the cache makes XLA copy the whole cache in and out of the branch
    every call; computing the block read-only in the branch and writing it here, outside,
    keeps the update in place."""
    cache = write_positions(cache, blk.positions)
    for layer in range(len(blk.k)):
        cache = write_layer(cache, layer, blk.k[layer], blk.v[layer])
    return advance(cache, blk.positions.shape[1])


def advance(cache: KVCache, n: int | jax.Array) -> KVCache:
    """Move every row's write pointer forward by ``n`` slots."""
    return cache.replace(length=cache.length + jnp.asarray(n, jnp.int32))


def rollback(cache: KVCache, length: jax.Array) -> KVCache:
    """Keep only slots ``< length[b]`` of each row (e.g. after a rejected draft).

    K/V entries past the new length stay in memory but are masked out (their
    position becomes -1) and are overwritten by the next write.
    """
    length = jnp.asarray(length, jnp.int32)
    slot = jnp.arange(cache.max_len, dtype=jnp.int32)[None, :]
    pos = jnp.where(slot < length[:, None], cache.pos, -1)
    return cache.replace(pos=pos, length=length)


def compact(cache: KVCache, start: jax.Array, keep: jax.Array, n_keep: jax.Array) -> KVCache:
    """Keep only chosen slots of a block written at ``start``.

    For each row b: slot ``start[b] + j`` takes the contents (K, V and
    position) of slot ``start[b] + keep[b, j]`` for ``j < n_keep[b]``; the
    row's length becomes ``start[b] + n_keep[b]`` and everything after it is
    emptied. ``keep [B, M]`` holds offsets inside the block, in the order the
    kept tokens should end up (a tree's accepted path, root first).
    """
    start = jnp.asarray(start, jnp.int32)
    keep = jnp.asarray(keep, jnp.int32)
    n_keep = jnp.asarray(n_keep, jnp.int32)
    M = keep.shape[1]

    def gather_block(buf):  # [B, S, ...] -> [B, M, ...]
        def one(b, s, kp):
            return jnp.take(b, s + kp, axis=0, mode="clip")

        return jax.vmap(one)(buf, start, keep)

    new_pos = gather_block(cache.pos)  # [B, M]
    j = jnp.arange(M, dtype=jnp.int32)[None, :]
    new_pos = jnp.where(j < n_keep[:, None], new_pos, -1)
    ks = tuple(_write_rows(kk, gather_block(kk), start) for kk in cache.k)
    vs = tuple(_write_rows(vv, gather_block(vv), start) for vv in cache.v)
    pos = _write_rows(cache.pos, new_pos, start)
    out = cache.replace(k=ks, v=vs, pos=pos)
    return rollback(out, start + n_keep)


def take_rows(cache: KVCache, idx: jax.Array) -> KVCache:
    """A cache of the rows ``idx [B']`` of ``cache``, in that order (a row may repeat): forking
    a row k ways (beams, candidate continuations) or reordering rows by a selection."""
    idx = jnp.asarray(idx, jnp.int32)
    take = lambda x: jnp.take(x, idx, axis=0)  # noqa: E731
    return KVCache(k=tuple(take(x) for x in cache.k), v=tuple(take(x) for x in cache.v), pos=take(cache.pos),
                   length=take(cache.length))


def block_visibility(cache: KVCache, block_mask: jax.Array, block_start: jax.Array) -> jax.Array:
    """``[B, T, S]``: ``block_mask [B, T, T]`` (which new tokens each new token
    may see, e.g. a tree's ancestor-or-self relation, so that siblings at equal
    depth do not see each other) spread over the cache slots of the block
    written at ``block_start``; True for every slot outside the block."""
    T = block_mask.shape[1]
    S = cache.max_len
    rel = jnp.arange(S, dtype=jnp.int32)[None, :] - block_start[:, None]  # [B, S]
    in_block = (rel >= 0) & (rel < T)
    idx = jnp.broadcast_to(jnp.clip(rel, 0, T - 1)[:, None, :], (rel.shape[0], T, S))
    bm = jnp.take_along_axis(block_mask, idx, axis=2)
    return jnp.where(in_block[:, None, :], bm, True)
