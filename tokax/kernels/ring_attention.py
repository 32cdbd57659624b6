"""Sequence-parallel ring attention and TokenRing under `shard_map`.

Ring attention (Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise
Transformers for Near-Infinite Context"): the sequence is split over the n
devices of a mesh axis. Device d keeps its query block Q_d; the key/value
blocks travel around the ring (`lax.ppermute`, d -> d+1), so after n steps
every Q_d has met every KV_e. The blocks are combined with the online softmax
of blockwise / flash attention: for each query row with running max m,
normaliser l and unnormalised output o, a new score block S (mask M) updates

    m' = max(m, rowmax(S)),   P = exp(S - m'),
    l' = exp(m - m') l + rowsum(P),   o' = exp(m - m') o + P V,

and the result is O = o / l, lse = m + log l. The backward pass is a custom
VJP (flash-attention backward, Dao 2023): with D_i = sum_d dO_id O_id and the
saved lse, each block pair recomputes P = exp(S - lse) and adds

    dV += P^T dO,   dS = P * (dO V^T - D),   dQ += dS K scale,   dK += dS^T Q scale,

while dK/dV ride around the ring with their K/V block and are home after n
hops, so no device ever holds more than O(block) of the sequence.

TokenRing (Wang, Liu, Li & Jiang 2024, arXiv:2412.20501): K/V stay put.
The query block travels one way around the ring (d -> d+1) and the partial
result of each step, (block_out, block_lse), goes back the other way to the
query's owner (d -> d-t, one hop on a fully connected mesh such as NVLink),
where it is merged by

    lse = logaddexp(lse_1, lse_2),   O = exp(lse_1 - lse) O_1 + exp(lse_2 - lse) O_2.

Both directions of each link carry data at once (Q forward, results back).
The backward pass mirrors it: (Q, dO, lse, D) travel forward, dQ partials
go back to their owner, dK/dV accumulate where K/V live.

Load balance. Under a causal mask the plain layout (device d holds tokens
[dL, (d+1)L)) leaves device 0 with one useful block and device n-1 with n.
`layout_permutation` gives the striped layout (token i on device i mod n,
Brandon et al. 2023, "Striped Attention") and the zigzag layout (the
sequence cut into 2n chunks, device d holding chunks d and 2n-1-d), which
give every device the same work. Masks are computed from the true token
positions carried with each block, so any layout is exact; chunk pairs whose
mask is empty are skipped with `lax.cond`, which is what turns the balanced
layouts into balanced compute and saves the masked half in the plain one.

Entry points:
  * `ring_attention(q, k, v, *, mesh, ...)` on global [B, S, H, D] arrays;
    it permutes tokens into the layout and back, so callers see natural order.
  * `ring_attention_shard(q, k, v, q_positions, kv_positions, *, axis_name, ...)`
    for code that already runs inside a `shard_map` over the sequence axis
    (the model), with the positions of its own tokens.
  * `layout_permutation` / `inverse_layout_permutation` (index arrays) and
    `to_layout` / `from_layout` (reorder an array) for the data pipeline
    and RoPE positions.
  * `comm_bytes_per_step` (formula) and `hlo_permute_bytes` (measured from
    compiled HLO) for the communication volume of each schedule.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

LAYOUTS = ("plain", "striped", "zigzag")
IMPLS = ("ring", "tokenring")

_F32 = jnp.float32

# Index of each counter in the per-device work statistics.
_STAT_NAMES = ("computed_pairs", "unmasked_pairs", "computed_blocks")


# --------------------------------------------------------------------------
# Layouts


def layout_permutation(seq_len: int, n: int, layout: str) -> np.ndarray:
    """Token order for a sequence layout over n devices: int64 [seq_len].

    `perm[p]` is the natural position of the token stored at slot p of the
    permuted sequence; device d holds slots [d L, (d+1) L), L = seq_len / n.
    Apply it as `x[:, perm]` to tokens, labels, loss masks and RoPE
    positions alike (the positions of the permuted sequence are `perm`).

      plain:   perm = 0, 1, ..., seq_len - 1.
      striped: device d holds tokens d, d + n, d + 2n, ...
      zigzag:  the sequence is cut into 2n equal chunks; device d holds
               chunks d and 2n - 1 - d (early and late tokens together).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: must be one of {LAYOUTS}")
    if n < 1:
        raise ValueError(f"n={n}: the number of devices must be >= 1")
    parts = 2 * n if layout == "zigzag" else n
    if seq_len % parts:
        raise ValueError(
            f"seq_len={seq_len} must be divisible by {parts} for layout={layout!r} "
            f"over {n} devices; pad the sequence to a multiple of {parts}"
        )
    if layout == "plain":
        return np.arange(seq_len)
    if layout == "striped":
        per = seq_len // n
        # slot d*per + j holds token j*n + d
        return (np.arange(per)[None, :] * n + np.arange(n)[:, None]).reshape(-1)
    chunk = seq_len // (2 * n)
    chunks = np.arange(seq_len).reshape(2 * n, chunk)
    order = np.stack([np.arange(n), 2 * n - 1 - np.arange(n)], axis=1).reshape(-1)
    return chunks[order].reshape(-1)


def inverse_layout_permutation(seq_len: int, n: int, layout: str) -> np.ndarray:
    """Inverse of `layout_permutation`: `x_perm[:, inv]` restores natural order."""
    perm = layout_permutation(seq_len, n, layout)
    inv = np.empty_like(perm)
    inv[perm] = np.arange(seq_len)
    return inv


def to_layout(x: Any, n: int, layout: str, axis: int = 1) -> Any:
    """Reorder the sequence axis of an array (numpy or jax) into `layout`.

    For the data pipeline: apply it to tokens, targets, loss masks, segment
    ids and RoPE positions (`to_layout(np.arange(S)[None], ...)` gives the
    positions of the reordered tokens), then shard the sequence axis.
    """
    perm = layout_permutation(x.shape[axis], n, layout)
    return x if layout == "plain" else x.take(perm, axis=axis)


def from_layout(x: Any, n: int, layout: str, axis: int = 1) -> Any:
    """Inverse of `to_layout`: back to natural token order."""
    inv = inverse_layout_permutation(x.shape[axis], n, layout)
    return x if layout == "plain" else x.take(inv, axis=axis)


# --------------------------------------------------------------------------
# Block kernels (run on one device, on local arrays)


@dataclasses.dataclass(frozen=True)
class _Config:
    axis_name: Any
    causal: bool
    window: int | None
    scale: float
    block_q: int
    block_k: int
    impl: str


def _chunk_mask(cfg: _Config, qpos, kpos, qseg, kseg) -> jax.Array:
    """[B or 1, cq, ck] bool: query i may read key j (same rule as full attention)."""
    qp = qpos[:, :, None]
    kp = kpos[:, None, :]
    mask = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), bool)
    if cfg.causal:
        mask &= kp <= qp
    if cfg.window is not None:
        mask &= qp - kp < cfg.window
        if not cfg.causal:
            mask &= kp - qp < cfg.window
    if qseg is not None:
        mask &= qseg[:, :, None] == kseg[:, None, :]
    return mask


def _slice(x, start, size, axis):
    return None if x is None else lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _fwd_block(cfg: _Config, state, qT, qpos, qseg, kT, vT, kpos, kseg):
    """Online-softmax update of `state` with one K/V block, chunk by chunk.

    qT [B, K, G, Lq, D]; kT, vT [B, K, Lk, D]; positions [B or 1, L];
    state = (o [B, K, G, Lq, D] f32 unnormalised, m, l [B, K, G, Lq] f32,
    stats [3] int32). Chunk pairs whose mask is empty are skipped.
    """
    batch, lq, lk = qT.shape[0], qT.shape[3], kT.shape[2]
    cq, ck = cfg.block_q, cfg.block_k

    def q_body(i, state):
        o, m, l, stats = state
        qi = _slice(qT, i * cq, cq, 3)
        oi, mi, li = _slice(o, i * cq, cq, 3), _slice(m, i * cq, cq, 3), _slice(l, i * cq, cq, 3)
        qpi, qsi = _slice(qpos, i * cq, cq, 1), _slice(qseg, i * cq, cq, 1)

        def k_body(j, carry):
            oi, mi, li, stats = carry
            kj, vj = _slice(kT, j * ck, ck, 2), _slice(vT, j * ck, ck, 2)
            mask = _chunk_mask(cfg, qpi, _slice(kpos, j * ck, ck, 1), qsi, _slice(kseg, j * ck, ck, 1))
            live = jnp.any(mask)

            def compute(oi, mi, li):
                s = jnp.einsum("bkgqd,bksd->bkgqs", qi, kj, preferred_element_type=_F32) * cfg.scale
                s = jnp.where(mask[:, None, None], s, -jnp.inf)
                m_new = jnp.maximum(mi, s.max(-1))
                # Rows with nothing seen yet keep m = -inf; shift by 0 there so
                # exp(-inf - 0) = 0 instead of NaN.
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                alpha = jnp.exp(mi - m_safe)
                p = jnp.exp(s - m_safe[..., None])
                l_new = alpha * li + p.sum(-1)
                pv = jnp.einsum("bkgqs,bksd->bkgqd", p, vj.astype(_F32))
                return oi * alpha[..., None] + pv, m_new, l_new

            oi, mi, li = lax.cond(live, compute, lambda a, b, c: (a, b, c), oi, mi, li)
            full = jnp.broadcast_to(mask, (batch,) + mask.shape[1:])
            add = jnp.stack([jnp.int32(batch * cq * ck), full.sum(dtype=jnp.int32), jnp.int32(1)])
            return oi, mi, li, stats + jnp.where(live, add, 0)

        oi, mi, li, stats = lax.fori_loop(0, lk // ck, k_body, (oi, mi, li, stats))
        o = lax.dynamic_update_slice_in_dim(o, oi, i * cq, axis=3)
        m = lax.dynamic_update_slice_in_dim(m, mi, i * cq, axis=3)
        l = lax.dynamic_update_slice_in_dim(l, li, i * cq, axis=3)
        return o, m, l, stats

    return lax.fori_loop(0, lq // cq, q_body, state)


def _init_state(qT, stats_like):
    o = jnp.zeros_like(qT, dtype=_F32)
    m = jnp.full_like(o[..., 0], -jnp.inf)
    return o, m, jnp.zeros_like(m), stats_like


def _finalize(state):
    """(o, m, l) -> (O = o / l [B, K, G, L, D] f32, lse [B, K, G, L]); empty rows give 0, -inf."""
    o, m, l, stats = state
    seen = l > 0
    out = o / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
    return out, lse, stats


def _merge(o1, lse1, o2, lse2):
    """Combine two partial softmax results over disjoint key sets (f32)."""
    mx = jnp.maximum(lse1, lse2)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    e1, e2 = jnp.exp(lse1 - mx), jnp.exp(lse2 - mx)
    tot = e1 + e2
    lse = jnp.where(tot > 0, mx + jnp.log(jnp.where(tot > 0, tot, 1.0)), -jnp.inf)
    w = jnp.where(tot > 0, tot, 1.0)
    o = (o1.astype(_F32) * (e1 / w)[..., None]) + (o2.astype(_F32) * (e2 / w)[..., None])
    return o, lse


def _bwd_block(cfg: _Config, grads, qT, doT, lse, delta, qpos, qseg, kT, vT, kpos, kseg):
    """Add one K/V block's contribution to (dq [B,K,G,Lq,D], dk, dv [B,K,Lk,D]) f32."""
    lq, lk = qT.shape[3], kT.shape[2]
    cq, ck = cfg.block_q, cfg.block_k

    def k_body(j, grads):
        dq, dk, dv = grads
        kj, vj = _slice(kT, j * ck, ck, 2), _slice(vT, j * ck, ck, 2)
        kpj, ksj = _slice(kpos, j * ck, ck, 1), _slice(kseg, j * ck, ck, 1)
        dkj, dvj = _slice(dk, j * ck, ck, 2), _slice(dv, j * ck, ck, 2)

        def q_body(i, carry):
            dq, dkj, dvj = carry
            mask = _chunk_mask(cfg, _slice(qpos, i * cq, cq, 1), kpj, _slice(qseg, i * cq, cq, 1), ksj)

            def compute(dq, dkj, dvj):
                qi, doi = _slice(qT, i * cq, cq, 3), _slice(doT, i * cq, cq, 3).astype(_F32)
                lsei, di = _slice(lse, i * cq, cq, 3), _slice(delta, i * cq, cq, 3)
                s = jnp.einsum("bkgqd,bksd->bkgqs", qi, kj, preferred_element_type=_F32) * cfg.scale
                lse_safe = jnp.where(jnp.isfinite(lsei), lsei, 0.0)
                p = jnp.where(mask[:, None, None], jnp.exp(s - lse_safe[..., None]), 0.0)
                dvj = dvj + jnp.einsum("bkgqs,bkgqd->bksd", p, doi)
                dp = jnp.einsum("bkgqd,bksd->bkgqs", doi, vj.astype(_F32))
                ds = p * (dp - di[..., None]) * cfg.scale
                dqi = jnp.einsum("bkgqs,bksd->bkgqd", ds, kj.astype(_F32))
                dq = lax.dynamic_update_slice_in_dim(dq, _slice(dq, i * cq, cq, 3) + dqi, i * cq, axis=3)
                dkj = dkj + jnp.einsum("bkgqs,bkgqd->bksd", ds, qi.astype(_F32))
                return dq, dkj, dvj

            return lax.cond(jnp.any(mask), compute, lambda a, b, c: (a, b, c), dq, dkj, dvj)

        dq, dkj, dvj = lax.fori_loop(0, lq // cq, q_body, (dq, dkj, dvj))
        dk = lax.dynamic_update_slice_in_dim(dk, dkj, j * ck, axis=2)
        dv = lax.dynamic_update_slice_in_dim(dv, dvj, j * ck, axis=2)
        return dq, dk, dv

    return lax.fori_loop(0, lk // ck, k_body, grads)


# --------------------------------------------------------------------------
# Ring and TokenRing schedules (per shard, inside shard_map)


def _shift(tree, axis_name, n: int, offset: int, stream: str):
    """Send every leaf from device d to device (d + offset) mod n.

    `stream` names the transfer in the HLO metadata (jax.named_scope), so
    benchmarks/ring_attention.py can count the bytes of each stream.
    """
    perm = [(j, (j + offset) % n) for j in range(n)]
    with jax.named_scope(stream):
        return jax.tree.map(lambda x: lax.ppermute(x, axis_name, perm), tree)


def _to_internal(q, k, v):
    """[B, L, H, D] -> qT [B, K, G, L, D], kT/vT [B, K, L, D] (K kv heads, G = H / K)."""
    b, lq, h, d = q.shape
    kvh = k.shape[2]
    qT = q.reshape(b, lq, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4)
    return qT, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _q_from_internal(xT):
    b, kvh, g, lq, d = xT.shape
    return xT.transpose(0, 3, 1, 2, 4).reshape(b, lq, kvh * g, d)


def _return(cfg: _Config, n: int, t: int, tree, stream: str):
    """Send a partial result computed for Q_{d-t} back to its owner d - t."""
    return tree if t == 0 else _shift(tree, cfg.axis_name, n, -t, stream)


def _forward(cfg: _Config, q, k, v, qpos, kpos, qseg, kseg):
    """Returns (out [B, L, H, D], lse [B, K, G, L] f32, stats [1, 3] int32)."""
    n = lax.axis_size(cfg.axis_name)
    qT, kT, vT = _to_internal(q, k, v)
    stats0 = jnp.zeros_like(qpos, dtype=jnp.int32, shape=(3,))
    if cfg.impl == "ring":
        # K/V (with positions and segment ids) move d -> d+1; at step t
        # device d holds block d - t. Compute and the next transfer are
        # independent, so XLA can overlap them.
        def step(_, carry):
            state, kv = carry
            state = _fwd_block(cfg, state, qT, qpos, qseg, *kv)
            return state, _shift(kv, cfg.axis_name, n, 1, "ring_kv")

        state, kv = lax.fori_loop(0, n - 1, step, (_init_state(qT, stats0), (kT, vT, kpos, kseg)))
        state = _fwd_block(cfg, state, qT, qpos, qseg, *kv)
        out, lse, stats = _finalize(state)
    else:
        # Step s: Q_{d-s} (with its positions) is here. Ship it on to d+1,
        # send the partial result of step s-1 (for Q_{d-s+1}) back to its
        # owner, compute this step's partial against the local K/V. The three
        # are independent, so both link directions and the compute overlap.
        # Partial results travel in the input dtype (block_out in the paper)
        # and merge in float32.
        returns = [functools.partial(_return, cfg, n, t, stream="tokenring_out") for t in range(n)]

        def step(s, carry, last=False):
            cur, pending, out, lse, stats = carry
            nxt = cur if last else _shift(cur, cfg.axis_name, n, 1, "tokenring_q")
            # s = 0 has nothing pending (an empty partial); switch clamps -1 to 0.
            out, lse = _merge(out, lse, *lax.switch(s - 1, returns, pending))
            tq, tpos, tseg = cur
            part_o, part_lse, stats = _finalize(
                _fwd_block(cfg, _init_state(tq, stats), tq, tpos, tseg, kT, vT, kpos, kseg)
            )
            return nxt, (part_o.astype(q.dtype), part_lse), out, lse, stats

        empty_o = jnp.zeros_like(qT, dtype=_F32)
        empty_lse = jnp.full_like(empty_o[..., 0], -jnp.inf)
        carry = ((qT, qpos, qseg), (empty_o.astype(q.dtype), empty_lse), empty_o, empty_lse, stats0)
        carry = lax.fori_loop(0, n - 1, step, carry)
        _, pending, out, lse, stats = step(n - 1, carry, last=True)
        out, lse = _merge(out, lse, *returns[n - 1](pending))
    return _q_from_internal(out).astype(q.dtype), lse, stats[None]


def _backward(cfg: _Config, res, dout):
    q, k, v, qpos, kpos, qseg, kseg, out, lse = res
    n = lax.axis_size(cfg.axis_name)
    qT, kT, vT = _to_internal(q, k, v)
    doT, oT = _to_internal(dout, k, v)[0], _to_internal(out, k, v)[0]
    delta = jnp.sum(doT.astype(_F32) * oT.astype(_F32), axis=-1)  # [B, K, G, L]
    dq = jnp.zeros_like(qT, dtype=_F32)
    dk, dv = jnp.zeros_like(kT, dtype=_F32), jnp.zeros_like(vT, dtype=_F32)
    if cfg.impl == "ring":
        # dK/dV travel with their K/V block and are home after n hops.
        def step(_, carry):
            dq, kv, dkv = carry
            dq, dk, dv = _bwd_block(cfg, (dq, *dkv), qT, doT, lse, delta, qpos, qseg, *kv)
            return dq, _shift(kv, cfg.axis_name, n, 1, "ring_kv_bwd"), _shift((dk, dv), cfg.axis_name, n, 1, "ring_dkv")

        dq, kv, dkv = lax.fori_loop(0, n - 1, step, (dq, (kT, vT, kpos, kseg), (dk, dv)))
        dq, dk, dv = _bwd_block(cfg, (dq, *dkv), qT, doT, lse, delta, qpos, qseg, *kv)
        dk, dv = _shift((dk, dv), cfg.axis_name, n, 1, "ring_dkv_home")
    else:
        # K/V and their gradients stay; (Q, dO, lse, D) travel forward and
        # each dQ partial goes back to its owner.
        returns = [functools.partial(_return, cfg, n, t, stream="tokenring_dq") for t in range(n)]

        def step(s, carry, last=False):
            cur, pending, dq, dk, dv = carry
            nxt = cur if last else _shift(cur, cfg.axis_name, n, 1, "tokenring_q_bwd")
            dq = dq + lax.switch(s - 1, returns, pending)
            tq, tdo, tlse, tdelta, tpos, tseg = cur
            part, dk, dv = _bwd_block(
                cfg, (jnp.zeros_like(dq), dk, dv), tq, tdo, tlse, tdelta, tpos, tseg, kT, vT, kpos, kseg
            )
            return nxt, part, dq, dk, dv

        carry = ((qT, doT, lse, delta, qpos, qseg), jnp.zeros_like(dq), dq, dk, dv)
        carry = lax.fori_loop(0, n - 1, step, carry)
        _, pending, dq, dk, dv = step(n - 1, carry, last=True)
        dq = dq + returns[n - 1](pending)
    dq = _q_from_internal(dq).astype(q.dtype)
    dk = dk.transpose(0, 2, 1, 3).astype(k.dtype)
    dv = dv.transpose(0, 2, 1, 3).astype(v.dtype)
    return dq, dk, dv, None, None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sharded_attention(cfg, q, k, v, qpos, kpos, qseg, kseg):
    out, _, stats = _forward(cfg, q, k, v, qpos, kpos, qseg, kseg)
    return out, stats


def _sharded_attention_fwd(cfg, q, k, v, qpos, kpos, qseg, kseg):
    out, lse, stats = _forward(cfg, q, k, v, qpos, kpos, qseg, kseg)
    return (out, stats), (q, k, v, qpos, kpos, qseg, kseg, out, lse)


def _sharded_attention_bwd(cfg, res, cts):
    dout, _ = cts  # the stats cotangent is float0
    return _backward(cfg, res, dout)


_sharded_attention.defvjp(_sharded_attention_fwd, _sharded_attention_bwd)


def _largest_divisor(n: int, cap: int) -> int:
    for c in range(min(n, cap), 0, -1):
        if n % c == 0:
            return c
    return 1


def _as_positions(x: jax.Array, batch: int, length: int, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != length or x.shape[0] not in (1, batch):
        raise ValueError(f"{name} has shape {x.shape}; expected [{length}] or [{batch}, {length}]")
    return x.astype(jnp.int32)


def ring_attention_shard(
    q: jax.Array,  # [B, Lq, H, D], this device's queries
    k: jax.Array,  # [B, Lk, KVH, D], this device's keys
    v: jax.Array,  # [B, Lk, KVH, D]
    q_positions: jax.Array,  # [Lq] or [B, Lq] int: natural token positions of q
    kv_positions: jax.Array,  # [Lk] or [B, Lk] int
    *,
    axis_name: Any = "sequence",
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    q_segment_ids: jax.Array | None = None,  # [B, Lq] int
    kv_segment_ids: jax.Array | None = None,  # [B, Lk] int; defaults to q_segment_ids
    impl: str = "ring",
    block_size: int = 512,
    return_stats: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Ring / TokenRing attention for one shard; call inside `shard_map`.

    Every device passes its own block of the (already laid out) sequence and
    the natural positions of those tokens, which define the mask exactly as
    full attention on the natural-order sequence would:
    causal (kv_pos <= q_pos), window W (q_pos - W < kv_pos, and
    kv_pos < q_pos + W when not causal), equal segment ids. Differentiable
    (custom VJP); memory per device is O(L * block_size).

    block_size: chunk length of the inner flash loop (rounded down to a
    divisor of the local length). With the zigzag layout pass a divisor of
    L / 2 so that chunks do not straddle the two halves and the masked half
    of each off-diagonal block is skipped.

    Returns out [B, Lq, H, D], and with return_stats also this device's work
    counters int32 [1, 3]: (q, k) pairs computed, unmasked pairs, chunk pairs
    computed (batch included; heads not).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: must be one of {IMPLS}")
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"q, k, v must be [B, L, H, D] with k.shape == v.shape; got {q.shape}, {k.shape}, {v.shape}")
    batch, lq, heads, dim = q.shape
    lk, kv_heads = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"q heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    if impl == "tokenring" and lq != lk:
        raise ValueError(f"impl='tokenring' needs equal q and kv block lengths; got {lq} and {lk}")
    if window is not None and window < 1:
        raise ValueError(f"window={window} must be >= 1 (or None)")
    qpos = _as_positions(q_positions, batch, lq, "q_positions")
    kpos = _as_positions(kv_positions, batch, lk, "kv_positions")
    if kv_segment_ids is None:
        kv_segment_ids = q_segment_ids
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("kv_segment_ids given without q_segment_ids")
    qseg = None if q_segment_ids is None else _as_positions(q_segment_ids, batch, lq, "q_segment_ids")
    kseg = None if kv_segment_ids is None else _as_positions(kv_segment_ids, batch, lk, "kv_segment_ids")
    cfg = _Config(
        axis_name=axis_name,
        causal=causal,
        window=window,
        scale=float(dim**-0.5 if scale is None else scale),
        block_q=_largest_divisor(lq, block_size),
        block_k=_largest_divisor(lk, block_size),
        impl=impl,
    )
    out, stats = _sharded_attention(cfg, q, k, v, qpos, kpos, qseg, kseg)
    return (out, stats) if return_stats else out


# --------------------------------------------------------------------------
# Global entry point


def ring_attention(
    q: jax.Array,  # [B, S, H, D]
    k: jax.Array,  # [B, S, KVH, D]
    v: jax.Array,  # [B, S, KVH, D]
    *,
    mesh: jax.sharding.Mesh,
    axis_name: str = "sequence",
    causal: bool = True,
    segment_ids: jax.Array | None = None,  # [B, S] int
    layout: str = "plain",
    impl: str = "ring",
    window: int | None = None,
    scale: float | None = None,
    block_size: int = 512,
    return_stats: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """softmax(scale Q K^T + M) V over the natural token order, computed by
    ring attention (impl='ring') or TokenRing (impl='tokenring') with the
    sequence sharded over `mesh.shape[axis_name]` devices in `layout`.

    Tokens are permuted into the layout on entry and back on exit, so the
    result equals full attention on the inputs. The mask M is causal
    (j <= i) if `causal`, i - window < j (and j < i + window when not causal)
    if `window`, and equal segment ids if `segment_ids`. Differentiable.

    With return_stats also returns per-device work counters, each int32
    [n]: 'computed_pairs', 'unmasked_pairs', 'computed_blocks'.
    """
    if axis_name not in mesh.shape:
        raise ValueError(f"axis_name={axis_name!r} is not a mesh axis; mesh axes are {tuple(mesh.shape)}")
    n = mesh.shape[axis_name]
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, seq, heads, head_dim]; got shape {q.shape}")
    batch, seq = q.shape[:2]
    if k.shape[:2] != (batch, seq):
        raise ValueError(f"k must have the batch and sequence length of q; got {k.shape} vs {q.shape}")
    perm = layout_permutation(seq, n, layout)  # also validates layout / divisibility
    inv = inverse_layout_permutation(seq, n, layout)
    local = seq // n
    # Chunks must not straddle the two zigzag halves, or no chunk pair is empty.
    block = _largest_divisor(local // 2 if layout == "zigzag" else local, block_size)

    identity = layout == "plain"
    take = (lambda x: x) if identity else (lambda x: jnp.take(x, perm, axis=1))
    args = [take(q), take(k), take(v), jnp.asarray(perm, jnp.int32)]
    specs = [P(None, axis_name, None, None)] * 3 + [P(axis_name)]
    if segment_ids is not None:
        if segment_ids.shape != (batch, seq):
            raise ValueError(f"segment_ids has shape {segment_ids.shape}; expected {(batch, seq)}")
        args.append(take(segment_ids))
        specs.append(P(None, axis_name))
    explicit = any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ()))
    if explicit:
        args = [jax.sharding.reshard(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]

    def per_shard(q, k, v, pos, seg=None):
        return ring_attention_shard(
            q, k, v, pos, pos,
            axis_name=axis_name, causal=causal, window=window, scale=scale,
            q_segment_ids=seg, kv_segment_ids=seg, impl=impl,
            block_size=block, return_stats=True,
        )

    out, stats = jax.shard_map(
        per_shard,
        mesh=mesh,
        in_specs=tuple(specs),
        out_specs=(P(None, axis_name, None, None), P(axis_name)),
    )(*args)
    if not identity:
        if explicit:  # gathers on an Explicit mesh must name their output sharding
            out = out.at[:, inv].get(out_sharding=NamedSharding(mesh, specs[0]))
        else:
            out = jnp.take(out, inv, axis=1)
    if not return_stats:
        return out
    return out, {name: stats[:, i] for i, name in enumerate(_STAT_NAMES)}


def comm_bytes_per_step(
    *,
    block_len: int,
    batch: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    itemsize: int,
    impl: str,
    backward: bool = False,
) -> dict[str, int]:
    """Bytes one device sends per ring step, split by stream (formula).

    "forward" goes to the next device (d -> d+1); "return" is TokenRing's
    stream back to the query's owner (d -> d-t). Integer positions and
    segment ids that travel with a block (4 bytes a token each) are not
    counted. Accumulated gradients and log-sum-exps travel in float32.

      ring, forward pass:        K, V                          2 L Hkv D b
      ring, backward pass:       K, V, dK, dV                  2 L Hkv D (b + 4)
      tokenring, forward pass:   Q -> ; (O, lse) <-            L H D b ; L H (D b + 4)
      tokenring, backward pass:  (Q, dO, lse, D) -> ; dQ <-    L H (2 D b + 8) ; 4 L H D
    (times the batch).
    """
    tokens = batch * block_len
    if impl == "ring":
        per_token = 2 * kv_heads * head_dim * (itemsize + (4 if backward else 0))
        return {"forward": tokens * per_token, "return": 0}
    if impl == "tokenring":
        if backward:
            return {"forward": tokens * heads * (2 * head_dim * itemsize + 8), "return": tokens * heads * head_dim * 4}
        return {"forward": tokens * heads * head_dim * itemsize, "return": tokens * heads * (head_dim * itemsize + 4)}
    raise ValueError(f"impl={impl!r}: must be one of {IMPLS}")


_STREAMS = ("ring_kv", "ring_kv_bwd", "ring_dkv", "ring_dkv_home", "tokenring_q", "tokenring_out",
            "tokenring_q_bwd", "tokenring_dq")
_HLO_SHAPE = re.compile(r"\b(pred|[su](?:8|16|32|64)|bf16|f16|f32|f64)\[([0-9,]*)\]")
_HLO_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                 "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def hlo_permute_bytes(hlo_text: str) -> dict[str, list[int]]:
    """Bytes per device of each ring step's transfers, read from compiled HLO.

    Returns {stream: [bytes of one step, ...]}: the collective-permutes are
    grouped by stream (the `jax.named_scope` that `_shift` puts in the op
    metadata), by the HLO computation that holds them and by their offset
    (target - source of the first pair), so that each group is one step's
    transfer: a while body holds one step of the ring, each branch of
    TokenRing's return switch one return. Bytes come from the result shapes.
    """
    groups: dict[str, dict[tuple[str, int], int]] = {}
    computation = "?"
    for line in hlo_text.splitlines():
        # Computation headers start in column 0 and open a brace; instructions are indented.
        if line[:1] not in ("", " ") and line.rstrip().endswith("{"):
            computation = line.replace("ENTRY ", "").split()[0]
        if " collective-permute(" not in line and " collective-permute-start(" not in line:
            continue
        name = re.search(r'op_name="([^"]*)"', line)
        parts = name.group(1).split("/") if name else []
        stream = next((p for p in parts if p in _STREAMS), "other")
        pair = re.search(r"source_target_pairs=\{\{(\d+),(\d+)\}", line)
        offset = int(pair.group(2)) - int(pair.group(1)) if pair else 0
        result_type = line.split("collective-permute")[0].split("=", 1)[1]
        nbytes = 0
        for dtype, dims in _HLO_SHAPE.findall(result_type):
            nbytes += int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) * _HLO_ITEMSIZE[dtype]
        if "collective-permute-start" in line:
            nbytes //= 2  # the async start's result holds (operand, destination) buffers
        key = (computation, offset)
        groups.setdefault(stream, {})[key] = groups.get(stream, {}).get(key, 0) + nbytes
    return {stream: sorted(g.values()) for stream, g in groups.items()}


__all__ = [
    "IMPLS",
    "LAYOUTS",
    "comm_bytes_per_step",
    "from_layout",
    "hlo_permute_bytes",
    "inverse_layout_permutation",
    "layout_permutation",
    "ring_attention",
    "ring_attention_shard",
    "to_layout",
]
