"""Flash attention forward and backward in Pallas (FlashAttention-2, Dao 2023).

Exact softmax attention computed tile by tile, never holding the [Tq, Tk]
score matrix. For a query tile Q_i and key/value tiles (K_j, V_j) the
forward keeps a running max m, normaliser l and unnormalised output A:

    S = scale * Q_i K_j^T            (masked entries -> excluded)
    m' = max(m, rowmax S),   P = exp(S - m')
    l' = exp(m - m') l + rowsum P,   A' = exp(m - m') A + P V_j

and ends with O_i = A / l, lse_i = m + log l. The backward recomputes
P = exp(S - lse) per tile and uses (FlashAttention-2, Alg. 2)

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),
    dQ = scale dS K,   dK = scale dS^T Q,   delta = rowsum(dO * O) - dlse,

where the `- dlse` term lets the log-sum-exp itself be differentiated
(d lse_i / d S_ij = P_ij), which shared-prefix and ring attention need to
merge partial results.

Masks are built inside each tile from per-token positions and segment
ids: causal (kv_pos <= q_pos), sliding window W (q_pos - W < kv_pos), and
segments (equal ids). Grouped-query attention: query head h reads kv head
h // (H // KVH). Tiles that the mask leaves empty are skipped: a cheap
per-block summary (min/max position and segment id) gives each query tile
the range of key tiles it can see, and the other way round for dK/dV.

Two lowerings of the same tile math, picked by backend:
  * 'gpu' (Triton): grid (batch, head, query tile); each program loops
    over its key tiles with `fori_loop`, K/V of the row addressed in HBM.
  * 'tpu' (Mosaic): layout [B, H, T, D] so that blocks are (rows, head_dim)
    tiles; the key-tile loop is the innermost "arbitrary" grid axis with
    VMEM scratch accumulators; the visible tile range is scalar-prefetched
    so skipped tiles are neither copied nor computed.
On CPU the 'gpu' variant runs in Pallas interpret mode (either can be
interpreted, which is how both are tested).

A query row that sees no key outputs zeros and lse = -inf.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

# Finite stand-in for -inf inside tiles: keeps exp(m - m') free of inf - inf.
_MASKED = -1e30


@dataclasses.dataclass(frozen=True)
class _Config:
    causal: bool
    window: int | None
    scale: float
    block_q: int
    block_k: int
    kv_len: int  # real number of keys; padded keys beyond it are masked
    groups: int  # query heads per kv head
    backend: str  # 'gpu' | 'tpu'
    interpret: bool


# ----------------------------------------------------------------------------
# Tile math shared by both lowerings.


def _dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b^T in float32: [m, d] x [n, d] -> [m, n]."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a^T @ b in float32: [m, n] x [m, d] -> [n, d]."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _tile_mask(q_pos, kv_pos, q_seg, kv_seg, kv_start, cfg: _Config):
    """Visibility of a tile: q_* are [bq, 1], kv_* are [1, bk]; -> [bq, bk] bool."""
    kv_idx = kv_start + jnp.arange(kv_pos.shape[1], dtype=jnp.int32)[None, :]
    mask = (q_seg == kv_seg) & (kv_idx < cfg.kv_len)
    if cfg.causal:
        mask = mask & (kv_pos <= q_pos)
    if cfg.window is not None:
        mask = mask & (q_pos - kv_pos < cfg.window)
        if not cfg.causal:
            mask = mask & (kv_pos - q_pos < cfg.window)
    return mask


def _fwd_tile(q, k, v, mask, m, l, acc, scale):
    """One online-softmax step; m, l: [bq, 1], acc: [bq, D] (float32)."""
    s = jnp.where(mask, _dot_nt(q, k) * scale, _MASKED)  # [bq, bk]
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    # where(): a fully masked row has s == m_new == _MASKED, exp would give 1.
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    l_new = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    acc_new = alpha * acc + _dot(p.astype(v.dtype), v)
    return m_new, l_new, acc_new


def _finalize(m, l, acc):
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    return acc / l_safe, jnp.where(empty, -jnp.inf, m + jnp.log(l_safe))


def _bwd_probs(q, k, mask, lse, scale):
    """P = exp(S - lse) of a tile, zero where masked; lse: [bq, 1]."""
    s = _dot_nt(q, k) * scale
    lse = jnp.where(lse == -jnp.inf, 0.0, lse)  # empty rows: every entry masked anyway
    return jnp.where(mask, jnp.exp(s - lse), 0.0)


# ----------------------------------------------------------------------------
# Which key tiles each query tile can see (and vice versa).


def _block_ranges(q_pos, kv_pos, q_seg, kv_seg, cfg: _Config):
    """Conservative tile visibility from per-tile min/max of positions and ids.

    Returns (k_lo, k_hi) [B, nq] and (q_lo, q_hi) [B, nk] int32: the first and
    last visible tile; an empty range is (0, -1). Exactness comes from the
    in-tile mask; this only decides what to skip.
    """
    b = q_pos.shape[0]
    qp = q_pos.reshape(b, -1, cfg.block_q)
    kp = kv_pos.reshape(b, -1, cfg.block_k)
    qs = q_seg.reshape(b, -1, cfg.block_q)
    ks = kv_seg.reshape(b, -1, cfg.block_k)
    qmin, qmax = qp.min(-1)[:, :, None], qp.max(-1)[:, :, None]  # [B, nq, 1]
    kmin, kmax = kp.min(-1)[:, None, :], kp.max(-1)[:, None, :]  # [B, 1, nk]
    vis = (ks.min(-1)[:, None, :] <= qs.max(-1)[:, :, None]) & (
        qs.min(-1)[:, :, None] <= ks.max(-1)[:, None, :]
    )  # [B, nq, nk]
    if cfg.causal:
        vis &= kmin <= qmax
    if cfg.window is not None:
        vis &= kmax > qmin - cfg.window
        if not cfg.causal:
            vis &= kmin < qmax + cfg.window

    def first_last(v, axis):
        n = v.shape[axis]
        anyv = v.any(axis)
        lo = jnp.argmax(v, axis)
        hi = n - 1 - jnp.argmax(jnp.flip(v, axis), axis)
        return jnp.where(anyv, lo, 0).astype(jnp.int32), jnp.where(anyv, hi, -1).astype(jnp.int32)

    return first_last(vis, 2), first_last(vis, 1)


# ----------------------------------------------------------------------------
# GPU (Triton) lowering: layout [B, T, H, D], loop over tiles inside a program.


def _gpu_fwd_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref,
                    o_ref, lse_ref, *, cfg: _Config):
    bq, bk = cfg.block_q, cfg.block_k
    q = q_ref[...]  # [bq, D]
    q_pos, q_seg = qp_ref[...][:, None], qs_ref[...][:, None]

    def body(j, carry):
        sl = pl.ds(j * bk, bk)
        mask = _tile_mask(q_pos, kp_ref[sl][None, :], q_seg, ks_ref[sl][None, :], j * bk, cfg)
        return _fwd_tile(q, k_ref[sl, :], v_ref[sl, :], mask, *carry, cfg.scale)

    init = (jnp.full((bq, 1), _MASKED, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
            jnp.zeros((bq, q.shape[-1]), jnp.float32))
    m, l, acc = lax.fori_loop(lo_ref[()], hi_ref[()] + 1, body, init)
    o, lse = _finalize(m, l, acc)
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse[:, 0]


def _gpu_dq_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref,
                   do_ref, lse_ref, delta_ref, dq_ref, *, cfg: _Config):
    bk = cfg.block_k
    q, do = q_ref[...], do_ref[...]  # [bq, D]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]  # [bq, 1]
    q_pos, q_seg = qp_ref[...][:, None], qs_ref[...][:, None]

    def body(j, dq):
        sl = pl.ds(j * bk, bk)
        k, v = k_ref[sl, :], v_ref[sl, :]
        mask = _tile_mask(q_pos, kp_ref[sl][None, :], q_seg, ks_ref[sl][None, :], j * bk, cfg)
        p = _bwd_probs(q, k, mask, lse, cfg.scale)
        ds = p * (_dot_nt(do, v) - delta)
        return dq + _dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(lo_ref[()], hi_ref[()] + 1, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _gpu_dkv_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref,
                    do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg: _Config):
    bq, bk = cfg.block_q, cfg.block_k
    k, v = k_ref[...], v_ref[...]  # [bk, D]
    kv_pos, kv_seg = kp_ref[...][None, :], ks_ref[...][None, :]
    kv_start = pl.program_id(2) * bk

    def body(i, carry):
        dk, dv = carry
        sl = pl.ds(i * bq, bq)
        q, do = q_ref[sl, :], do_ref[sl, :]
        mask = _tile_mask(qp_ref[sl][:, None], kv_pos, qs_ref[sl][:, None], kv_seg, kv_start, cfg)
        p = _bwd_probs(q, k, mask, lse_ref[sl][:, None], cfg.scale)  # [bq, bk]
        ds = p * (_dot_nt(do, v) - delta_ref[sl][:, None])
        return dk + _dot_tn(ds.astype(q.dtype), q), dv + _dot_tn(p.astype(do.dtype), do)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(lo_ref[()], hi_ref[()] + 1, body, (zeros, zeros))
    dk_ref[...] = dk * cfg.scale
    dv_ref[...] = dv


def _gpu_params(d):
    return plgpu.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2)


def _gpu_fwd(cfg, q, k, v, qpos, kpos, qseg, kseg):
    b, tq, h, d = q.shape
    tk = k.shape[1]
    bq, g = cfg.block_q, cfg.groups
    (k_lo, k_hi), _ = _block_ranges(qpos, kpos, qseg, kseg, cfg)
    row = lambda bi, hi, i: (bi, i)  # noqa: E731
    return pl.pallas_call(
        functools.partial(_gpu_fwd_kernel, cfg=cfg),
        grid=(b, h, tq // bq),
        in_specs=[
            pl.BlockSpec((None, None), row), pl.BlockSpec((None, None), row),
            pl.BlockSpec((None, bq, None, d), lambda bi, hi, i: (bi, i, hi, 0)),
            pl.BlockSpec((None, tk, None, d), lambda bi, hi, i: (bi, 0, lax.div(hi, g), 0)),
            pl.BlockSpec((None, tk, None, d), lambda bi, hi, i: (bi, 0, lax.div(hi, g), 0)),
            pl.BlockSpec((None, bq), row), pl.BlockSpec((None, tk), lambda bi, hi, i: (bi, 0)),
            pl.BlockSpec((None, bq), row), pl.BlockSpec((None, tk), lambda bi, hi, i: (bi, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, d), lambda bi, hi, i: (bi, i, hi, 0)),
            pl.BlockSpec((None, None, bq), lambda bi, hi, i: (bi, hi, i)),
        ],
        out_shape=[q, jax.ShapeDtypeStruct((b, h, tq), jnp.float32)],
        compiler_params=_gpu_params(d),
        interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(k_lo, k_hi, q, k, v, qpos, kpos, qseg, kseg)


def _gpu_bwd(cfg, q, k, v, qpos, kpos, qseg, kseg, do, lse, delta):
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.groups
    (k_lo, k_hi), (q_lo, q_hi) = _block_ranges(qpos, kpos, qseg, kseg, cfg)
    row = lambda bi, hi, i: (bi, i)  # noqa: E731
    whole_row = lambda bi, hi, i: (bi, 0)  # noqa: E731
    q_tile = pl.BlockSpec((None, bq, None, d), lambda bi, hi, i: (bi, i, hi, 0))
    kv_all = pl.BlockSpec((None, tk, None, d), lambda bi, hi, i: (bi, 0, lax.div(hi, g), 0))
    dq = pl.pallas_call(
        functools.partial(_gpu_dq_kernel, cfg=cfg),
        grid=(b, h, tq // bq),
        in_specs=[
            pl.BlockSpec((None, None), row), pl.BlockSpec((None, None), row),
            q_tile, kv_all, kv_all,
            pl.BlockSpec((None, bq), row), pl.BlockSpec((None, tk), whole_row),
            pl.BlockSpec((None, bq), row), pl.BlockSpec((None, tk), whole_row),
            q_tile,
            pl.BlockSpec((None, None, bq), lambda bi, hi, i: (bi, hi, i)),
            pl.BlockSpec((None, None, bq), lambda bi, hi, i: (bi, hi, i)),
        ],
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_gpu_params(d),
        interpret=cfg.interpret,
        name="flash_attention_dq",
    )(k_lo, k_hi, q, k, v, qpos, kpos, qseg, kseg, do, lse, delta)

    # dK, dV per query head (more parallel programs, no cross-program
    # accumulation), then summed over each kv head's group.
    q_all = pl.BlockSpec((None, tq, None, d), lambda bi, hi, j: (bi, 0, hi, 0))
    kv_tile = pl.BlockSpec((None, bk, None, d), lambda bi, hi, j: (bi, j, lax.div(hi, g), 0))
    dkv_tile = pl.BlockSpec((None, bk, None, d), lambda bi, hi, j: (bi, j, hi, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_gpu_dkv_kernel, cfg=cfg),
        grid=(b, h, tk // bk),
        in_specs=[
            pl.BlockSpec((None, None), row), pl.BlockSpec((None, None), row),
            q_all, kv_tile, kv_tile,
            pl.BlockSpec((None, tq), whole_row), pl.BlockSpec((None, bk), row),
            pl.BlockSpec((None, tq), whole_row), pl.BlockSpec((None, bk), row),
            q_all,
            pl.BlockSpec((None, None, tq), lambda bi, hi, j: (bi, hi, 0)),
            pl.BlockSpec((None, None, tq), lambda bi, hi, j: (bi, hi, 0)),
        ],
        out_specs=[dkv_tile, dkv_tile],
        out_shape=[jax.ShapeDtypeStruct((b, tk, h, d), jnp.float32)] * 2,
        compiler_params=_gpu_params(d),
        interpret=cfg.interpret,
        name="flash_attention_dkv",
    )(q_lo, q_hi, q, k, v, qpos, kpos, qseg, kseg, do, lse, delta)
    dk = dk.reshape(b, tk, kvh, g, d).sum(3).astype(k.dtype)
    dv = dv.reshape(b, tk, kvh, g, d).sum(3).astype(v.dtype)
    return dq, dk, dv


# ----------------------------------------------------------------------------
# TPU (Mosaic) lowering: layout [B, H, T, D]; key tiles on an "arbitrary" grid
# axis with VMEM accumulators. Per-token metadata is shaped [B, T, 1] on the
# query side and [B, 1, T] on the key side so that every block's last two
# dims are TPU tiles (multiple of 8 x 128, or the full dim).


def _clamp(i, lo, hi):
    """Tile index to fetch: skipped tiles re-use a visible one (no new DMA)."""
    return jnp.maximum(jnp.minimum(jnp.maximum(i, lo), hi), 0)


def _tpu_fwd_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref,
                    o_ref, lse_ref, m_sc, l_sc, acc_sc, *, cfg: _Config):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _MASKED, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when((j >= lo_ref[b, i]) & (j <= hi_ref[b, i]))
    def _compute():
        mask = _tile_mask(qp_ref[...], kp_ref[...], qs_ref[...], ks_ref[...], j * cfg.block_k, cfg)
        m, l, acc = _fwd_tile(q_ref[...], k_ref[...], v_ref[...], mask,
                              m_sc[...], l_sc[...], acc_sc[...], cfg.scale)
        m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

    @pl.when(j == pl.num_programs(3) - 1)
    def _done():
        o, lse = _finalize(m_sc[...], l_sc[...], acc_sc[...])
        o_ref[...] = o.astype(o_ref.dtype)
        lse_ref[...] = lse


def _tpu_dq_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref,
                   do_ref, lse_ref, delta_ref, dq_ref, dq_sc, *, cfg: _Config):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when((j >= lo_ref[b, i]) & (j <= hi_ref[b, i]))
    def _compute():
        k, v = k_ref[...], v_ref[...]
        mask = _tile_mask(qp_ref[...], kp_ref[...], qs_ref[...], ks_ref[...], j * cfg.block_k, cfg)
        p = _bwd_probs(q_ref[...], k, mask, lse_ref[...], cfg.scale)
        ds = p * (_dot_nt(do_ref[...], v) - delta_ref[...])
        dq_sc[...] += _dot(ds.astype(k.dtype), k)

    @pl.when(j == pl.num_programs(3) - 1)
    def _done():
        dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _tpu_dkv_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref,
                    do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, cfg: _Config):
    b, j, gi, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((gi == 0) & (i == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when((i >= lo_ref[b, j]) & (i <= hi_ref[b, j]))
    def _compute():
        q, do = q_ref[...], do_ref[...]
        k, v = k_ref[...], v_ref[...]
        mask = _tile_mask(qp_ref[...], kp_ref[...], qs_ref[...], ks_ref[...], j * cfg.block_k, cfg)
        p = _bwd_probs(q, k, mask, lse_ref[...], cfg.scale)
        ds = p * (_dot_nt(do, v) - delta_ref[...])
        dk_sc[...] += _dot_tn(ds.astype(q.dtype), q)
        dv_sc[...] += _dot_tn(p.astype(do.dtype), do)

    @pl.when((gi == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
    def _done():
        dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _tpu_layout(qpos, kpos, qseg, kseg):
    return qpos[:, :, None], kpos[:, None, :], qseg[:, :, None], kseg[:, None, :]


def _tpu_fwd(cfg, q, k, v, qpos, kpos, qseg, kseg):
    b, tq, h, d = q.shape
    tk = k.shape[1]
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.groups
    (k_lo, k_hi), _ = _block_ranges(qpos, kpos, qseg, kseg, cfg)
    qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, H, T, D]

    def kv_map(bi, hi, i, j, lo, hi_r):
        return (bi, lax.div(hi, g), _clamp(j, lo[bi, i], hi_r[bi, i]), 0)

    def kmeta_map(bi, hi, i, j, lo, hi_r):
        return (bi, 0, _clamp(j, lo[bi, i], hi_r[bi, i]))

    q_map = lambda bi, hi, i, j, *_: (bi, hi, i, 0)  # noqa: E731
    qmeta_map = lambda bi, hi, i, j, *_: (bi, i, 0)  # noqa: E731
    o, lse = pl.pallas_call(
        functools.partial(_tpu_fwd_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, h, tq // bq, tk // bk),
            in_specs=[
                pl.BlockSpec((None, None, bq, d), q_map),
                pl.BlockSpec((None, None, bk, d), kv_map),
                pl.BlockSpec((None, None, bk, d), kv_map),
                pl.BlockSpec((None, bq, 1), qmeta_map), pl.BlockSpec((None, 1, bk), kmeta_map),
                pl.BlockSpec((None, bq, 1), qmeta_map), pl.BlockSpec((None, 1, bk), kmeta_map),
            ],
            out_specs=[pl.BlockSpec((None, None, bq, d), q_map),
                       pl.BlockSpec((None, None, bq, 1), q_map)],
            scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                            pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(qt.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, tq, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(k_lo, k_hi, qt, kt, vt, *_tpu_layout(qpos, kpos, qseg, kseg))
    return o.transpose(0, 2, 1, 3), lse[..., 0]


def _tpu_bwd(cfg, q, k, v, qpos, kpos, qseg, kseg, do, lse, delta):
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.groups
    (k_lo, k_hi), (q_lo, q_hi) = _block_ranges(qpos, kpos, qseg, kseg, cfg)
    qt, kt, vt, dot_ = (x.transpose(0, 2, 1, 3) for x in (q, k, v, do))
    lse4, delta4 = lse[..., None], delta[..., None]  # [B, H, Tq, 1]
    meta = _tpu_layout(qpos, kpos, qseg, kseg)

    # dQ: grid (b, h, query tile, key tile).
    def kv_map(bi, hi, i, j, lo, hi_r):
        return (bi, lax.div(hi, g), _clamp(j, lo[bi, i], hi_r[bi, i]), 0)

    def kmeta_map(bi, hi, i, j, lo, hi_r):
        return (bi, 0, _clamp(j, lo[bi, i], hi_r[bi, i]))

    q_map = lambda bi, hi, i, j, *_: (bi, hi, i, 0)  # noqa: E731
    qmeta_map = lambda bi, hi, i, j, *_: (bi, i, 0)  # noqa: E731
    q_tile = pl.BlockSpec((None, None, bq, d), q_map)
    row_tile = pl.BlockSpec((None, None, bq, 1), q_map)
    dq = pl.pallas_call(
        functools.partial(_tpu_dq_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, h, tq // bq, tk // bk),
            in_specs=[
                q_tile, pl.BlockSpec((None, None, bk, d), kv_map),
                pl.BlockSpec((None, None, bk, d), kv_map),
                pl.BlockSpec((None, bq, 1), qmeta_map), pl.BlockSpec((None, 1, bk), kmeta_map),
                pl.BlockSpec((None, bq, 1), qmeta_map), pl.BlockSpec((None, 1, bk), kmeta_map),
                q_tile, row_tile, row_tile,
            ],
            out_specs=q_tile,
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="flash_attention_dq",
    )(k_lo, k_hi, qt, kt, vt, *meta, dot_, lse4, delta4)

    # dK, dV: grid (b, kv head, key tile, head in group, query tile); the last
    # two axes accumulate into one kv tile.
    def qh_map(bi, gh, j, gi, i, lo, hi_r):
        return (bi, gh * g + gi, _clamp(i, lo[bi, j], hi_r[bi, j]), 0)

    def qmeta2_map(bi, gh, j, gi, i, lo, hi_r):
        return (bi, _clamp(i, lo[bi, j], hi_r[bi, j]), 0)

    kv2_map = lambda bi, gh, j, gi, i, *_: (bi, gh, j, 0)  # noqa: E731
    kmeta2_map = lambda bi, gh, j, gi, i, *_: (bi, 0, j)  # noqa: E731
    q2_tile = pl.BlockSpec((None, None, bq, d), qh_map)
    row2_tile = pl.BlockSpec((None, None, bq, 1), qh_map)
    kv2_tile = pl.BlockSpec((None, None, bk, d), kv2_map)
    dk, dv = pl.pallas_call(
        functools.partial(_tpu_dkv_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, kvh, tk // bk, g, tq // bq),
            in_specs=[
                q2_tile, kv2_tile, kv2_tile,
                pl.BlockSpec((None, bq, 1), qmeta2_map), pl.BlockSpec((None, 1, bk), kmeta2_map),
                pl.BlockSpec((None, bq, 1), qmeta2_map), pl.BlockSpec((None, 1, bk), kmeta2_map),
                q2_tile, row2_tile, row2_tile,
            ],
            out_specs=[kv2_tile, kv2_tile],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(kt.shape, k.dtype), jax.ShapeDtypeStruct(vt.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=cfg.interpret,
        name="flash_attention_dkv",
    )(q_lo, q_hi, qt, kt, vt, *meta, dot_, lse4, delta4)
    return dq.transpose(0, 2, 1, 3), dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3)


# ----------------------------------------------------------------------------
# custom_vjp over padded, canonical inputs.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q, k, v, qpos, kpos, qseg, kseg):
    fwd = _tpu_fwd if cfg.backend == "tpu" else _gpu_fwd
    return fwd(cfg, q, k, v, qpos, kpos, qseg, kseg)


def _flash_fwd(cfg, q, k, v, qpos, kpos, qseg, kseg):
    o, lse = _flash(cfg, q, k, v, qpos, kpos, qseg, kseg)
    return (o, lse), (q, k, v, qpos, kpos, qseg, kseg, o, lse)


def _flash_bwd(cfg, res, cts):
    q, k, v, qpos, kpos, qseg, kseg, o, lse = res
    do, dlse = cts
    # delta_i = rowsum(dO * O) - dlse_i  [B, H, Tq]
    delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), o.astype(jnp.float32))
    delta = delta - dlse.astype(jnp.float32)
    bwd = _tpu_bwd if cfg.backend == "tpu" else _gpu_bwd
    dq, dk, dv = bwd(cfg, q, k, v, qpos, kpos, qseg, kseg, do.astype(q.dtype), lse, delta)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------
# Public API.


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _default_blocks(backend: str, tq: int, tk: int) -> tuple[int, int]:
    if backend == "tpu":
        # Rows in multiples of 8 sublanes; key tiles 128 lanes or the whole axis.
        return min(128, _round_up(tq, 8)), (128 if tk > 128 else _round_up(tk, 8))
    # Triton: power-of-two tiles of at least 16 (tensor-core dot minimum).
    return (min(64, max(16, pl.next_power_of_2(tq))), min(64, max(16, pl.next_power_of_2(tk))))


def resolve_backend(backend: str | None, interpret: bool | None) -> tuple[str, bool]:
    """('gpu' | 'tpu', interpret): by default the platform's own lowering; on
    CPU the GPU-style kernel in interpret mode."""
    platform = jax.default_backend()
    if backend is None:
        backend = "tpu" if platform == "tpu" else "gpu"
    if backend not in ("gpu", "tpu"):
        raise ValueError(f"backend must be 'gpu' or 'tpu', got {backend!r}")
    if interpret is None:
        interpret = platform == "cpu"
    return backend, bool(interpret)


def _pad_axis(x: jax.Array, axis: int, size: int, mode: str = "constant") -> jax.Array:
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, mode=mode)


def flash_attention_with_lse(
    q: jax.Array,  # [B, Tq, H, D]
    k: jax.Array,  # [B, Tk, KVH, D]
    v: jax.Array,  # [B, Tk, KVH, D]
    *,
    causal: bool = True,
    window: int | None = None,
    segment_ids: jax.Array | None = None,  # [B, Tq] int
    kv_segment_ids: jax.Array | None = None,  # [B, Tk] int; defaults to segment_ids
    q_positions: jax.Array | None = None,  # [B, Tq] int; default Tk - Tq + arange(Tq)
    kv_positions: jax.Array | None = None,  # [B, Tk] int; default arange(Tk)
    scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Flash attention returning (out [B, Tq, H, D], lse [B, H, Tq] float32).

    out = softmax(scale * q k^T + mask) v and lse = logsumexp of the masked
    scaled scores; both are differentiable. See `flash_attention`.
    """
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"q, k, v must be [B, T, heads, D] with k.shape == v.shape; got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k/v batch and head_dim must match q: q {q.shape}, k {k.shape}")
    if h % kvh:
        raise ValueError(f"q heads ({h}) must be a multiple of k/v heads ({kvh})")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    backend, interpret = resolve_backend(backend, interpret)
    scale = float(d ** -0.5 if scale is None else scale)

    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(tq, dtype=jnp.int32) + (tk - tq), (b, tq))
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(tk, dtype=jnp.int32), (b, tk))
    if segment_ids is None and kv_segment_ids is not None:
        raise ValueError("kv_segment_ids given without segment_ids (the query side)")
    if segment_ids is None:
        segment_ids = jnp.zeros((b, tq), jnp.int32)
        kv_segment_ids = jnp.zeros((b, tk), jnp.int32)
    if kv_segment_ids is None:
        if tq != tk:
            raise ValueError("segment_ids with Tq != Tk needs kv_segment_ids too")
        kv_segment_ids = segment_ids
    for name, x, t in (("segment_ids", segment_ids, tq), ("kv_segment_ids", kv_segment_ids, tk),
                       ("q_positions", q_positions, tq), ("kv_positions", kv_positions, tk)):
        if x.shape != (b, t):
            raise ValueError(f"{name} must be [B={b}, T={t}], got {x.shape}")

    bq0, bk0 = _default_blocks(backend, tq, tk)
    bq, bk = block_q or bq0, block_k or bk0
    tq_p, tk_p = _round_up(tq, bq), _round_up(tk, bk)
    # Triton tiles need a power-of-two head_dim; zero columns change no dot product.
    d_p = pl.next_power_of_2(d) if backend == "gpu" else d
    cfg = _Config(causal=causal, window=window, scale=scale, block_q=bq, block_k=bk,
                  kv_len=tk, groups=h // kvh, backend=backend, interpret=interpret)
    as_i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    # Padded rows copy the last real position/segment ("edge") so that tile
    # summaries stay tight; padded keys are masked by index, padded queries
    # are sliced off.
    o, lse = _flash(
        cfg,
        _pad_axis(_pad_axis(q, 1, tq_p), 3, d_p),
        _pad_axis(_pad_axis(k, 1, tk_p), 3, d_p),
        _pad_axis(_pad_axis(v, 1, tk_p), 3, d_p),
        _pad_axis(as_i32(q_positions), 1, tq_p, "edge"),
        _pad_axis(as_i32(kv_positions), 1, tk_p, "edge"),
        _pad_axis(as_i32(segment_ids), 1, tq_p, "edge"),
        _pad_axis(as_i32(kv_segment_ids), 1, tk_p, "edge"),
    )
    return o[:, :tq, :, :d], lse[:, :, :tq]


def flash_attention(
    q: jax.Array,  # [B, Tq, H, D]
    k: jax.Array,  # [B, Tk, KVH, D]
    v: jax.Array,  # [B, Tk, KVH, D]
    *,
    causal: bool = True,
    window: int | None = None,
    segment_ids: jax.Array | None = None,
    interpret: bool | None = None,
    **kwargs,
) -> jax.Array:
    """Memory-efficient exact attention: [B, Tq, H, D].

    Query at position i sees key position j when (causal) j <= i, (window=W)
    i - W < j (and j < i + W when not causal), and (segment_ids) the ids
    match. Fewer k/v heads than q heads is grouped-query attention.
    interpret=None runs the Pallas interpreter on CPU. Extra keyword
    arguments (kv_segment_ids, q_positions, kv_positions, scale, block_q,
    block_k, backend) are those of `flash_attention_with_lse`.
    """
    return flash_attention_with_lse(q, k, v, causal=causal, window=window,
                                    segment_ids=segment_ids, interpret=interpret, **kwargs)[0]
