"""Per-token log-probs over a large vocabulary without the full logits.

For hidden states h_n, output embedding E (tied LM head) and targets y_n,

    log p(y_n | h_n) = z_{n, y_n} - logsumexp_v z_{n, v},   z = h E^T,

with the log-sum-exp accumulated online over vocabulary chunks
(m' = max(m, max_v z), l' = l e^{m - m'} + sum_v e^{z_v - m'}). The
backward recomputes each chunk's logits instead of storing them:

    dz_{n,v} = g_n (1[v = y_n] - p_{n,v}),   p = e^{z - lse},
    dh_n = sum_v dz_{n,v} E_v,               dE_v = sum_n dz_{n,v} h_n.

Peak extra memory is one [tokens, chunk] tile instead of [tokens, V]
(8 x 1024 tokens x 262,144 float32 logits are 8 GiB).

Three implementations, picked by the training config's `logprobs_impl`:
  'chunked_kernel'  Pallas kernels (Triton-style: one program per token tile
                    looping over vocabulary tiles for the forward and dh, one
                    per vocabulary tile looping over tokens for dE); runs in
                    interpret mode on CPU. On TPU it uses 'chunked'.
  'chunked'         pure JAX: `lax.scan` over vocabulary chunks, custom VJP.
  'full'            log_softmax of the full logits (the reference).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from tokax.kernels import reference

LOGPROBS_IMPLS = ("chunked_kernel", "chunked", "full")
_MASKED = -1e30


def _check(hidden, embedding, targets):
    if hidden.ndim != 3 or embedding.ndim != 2 or hidden.shape[-1] != embedding.shape[-1]:
        raise ValueError(f"need hidden [B, T, D] and embedding [V, D] with the same D; got "
                         f"hidden {hidden.shape}, embedding {embedding.shape}")
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"targets must be [B, T] = {hidden.shape[:2]}, got {targets.shape}")


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def full_logprobs(hidden: jax.Array, embedding: jax.Array, targets: jax.Array) -> jax.Array:
    """log_softmax(hidden @ embedding^T)[targets] with full logits: [B, T] float32."""
    _check(hidden, embedding, targets)
    return reference.logprobs(hidden, embedding, targets)


# ----------------------------------------------------------------------------
# Pure JAX: scan over vocabulary chunks.


def _scan_chunks(e: jax.Array, chunk: int) -> jax.Array:
    return e.reshape(-1, chunk, e.shape[-1])  # [nc, C, D]


def _chunk_logits(h, e_c, c, chunk, vocab):
    """Logits of chunk c with padded vocabulary columns masked: [N, C] f32."""
    z = jnp.einsum("nd,vd->nv", h, e_c, preferred_element_type=jnp.float32)
    col = c * chunk + jnp.arange(chunk)[None, :]
    return jnp.where(col < vocab, z, _MASKED), col


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _scan_logprobs(h, e, t, chunk: int, vocab: int):
    return _scan_fwd(h, e, t, chunk, vocab)[0]


def _scan_fwd(h, e, t, chunk, vocab):
    n = h.shape[0]

    def step(carry, xs):
        m, l, tl = carry
        c, e_c = xs
        z, col = _chunk_logits(h, e_c, c, chunk, vocab)
        m_new = jnp.maximum(m, z.max(-1))
        l = l * jnp.exp(m - m_new) + jnp.exp(z - m_new[:, None]).sum(-1)
        tl = tl + jnp.where(col == t[:, None], z, 0.0).sum(-1)
        return (m_new, l, tl), None

    init = (jnp.full((n,), _MASKED, jnp.float32), jnp.zeros((n,), jnp.float32),
            jnp.zeros((n,), jnp.float32))
    e_chunks = _scan_chunks(e, chunk)
    (m, l, tl), _ = lax.scan(step, init, (jnp.arange(e_chunks.shape[0]), e_chunks))
    lse = m + jnp.log(l)
    return tl - lse, (h, e, t, lse)


def _scan_bwd(chunk, vocab, res, g):
    h, e, t, lse = res
    g = g.astype(jnp.float32)

    def step(dh, xs):
        c, e_c = xs
        z, col = _chunk_logits(h, e_c, c, chunk, vocab)
        dz = g[:, None] * (jnp.where(col == t[:, None], 1.0, 0.0) - jnp.exp(z - lse[:, None]))
        dh = dh + jnp.einsum("nv,vd->nd", dz, e_c.astype(jnp.float32))
        de_c = jnp.einsum("nv,nd->vd", dz, h.astype(jnp.float32))
        return dh, de_c.astype(e.dtype)

    e_chunks = _scan_chunks(e, chunk)
    dh, de = lax.scan(step, jnp.zeros(h.shape, jnp.float32),
                      (jnp.arange(e_chunks.shape[0]), e_chunks))
    return dh.astype(h.dtype), de.reshape(e.shape), None


_scan_logprobs.defvjp(_scan_fwd, _scan_bwd)


def chunked_logprobs_scan(
    hidden: jax.Array,  # [B, T, D]
    embedding: jax.Array,  # [V, D]
    targets: jax.Array,  # [B, T] int
    *,
    chunk_size: int = 8192,
) -> jax.Array:
    """log softmax(hidden @ embedding^T)[targets]: [B, T] float32, via `lax.scan`
    over vocabulary chunks of `chunk_size` (online log-sum-exp, recomputing
    backward)."""
    _check(hidden, embedding, targets)
    b, t, d = hidden.shape
    vocab = embedding.shape[0]
    chunk = min(chunk_size, vocab)
    e = _pad_to(embedding, 0, _round_up(vocab, chunk))
    out = _scan_logprobs(hidden.reshape(b * t, d), e, targets.reshape(-1).astype(jnp.int32),
                         chunk, vocab)
    return out.reshape(b, t)


# ----------------------------------------------------------------------------
# Pallas kernels (Triton-style tiles; interpret mode on CPU).


def _tile_logits(h, e_c, c, chunk, vocab):
    z = lax.dot_general(h, e_c, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    col = c * chunk + jnp.arange(chunk, dtype=jnp.int32)[None, :]
    return jnp.where(col < vocab, z, _MASKED), col  # [bn, C], [1, C]


def _fwd_kernel(h_ref, e_ref, t_ref, lse_ref, tl_ref, *, chunk, vocab, n_chunks):
    h = h_ref[...]  # [bn, D]
    tgt = t_ref[...][:, None]  # [bn, 1]

    def body(c, carry):
        m, l, tl = carry
        z, col = _tile_logits(h, e_ref[pl.ds(c * chunk, chunk), :], c, chunk, vocab)
        m_new = jnp.maximum(m, jnp.max(z, axis=1, keepdims=True))
        l = l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new), axis=1, keepdims=True)
        tl = tl + jnp.sum(jnp.where(col == tgt, z, 0.0), axis=1, keepdims=True)
        return m_new, l, tl

    bn = h.shape[0]
    init = (jnp.full((bn, 1), _MASKED, jnp.float32), jnp.zeros((bn, 1), jnp.float32),
            jnp.zeros((bn, 1), jnp.float32))
    m, l, tl = lax.fori_loop(0, n_chunks, body, init)
    lse_ref[...] = (m + jnp.log(l))[:, 0]
    tl_ref[...] = tl[:, 0]


def _dz(h, e_c, c, tgt, lse, g, chunk, vocab):
    """dLoss/dlogits of one tile: g (onehot(y) - p); [bn, C] f32."""
    z, col = _tile_logits(h, e_c, c, chunk, vocab)
    return g * (jnp.where(col == tgt, 1.0, 0.0) - jnp.exp(z - lse))


def _dh_kernel(h_ref, e_ref, t_ref, lse_ref, g_ref, dh_ref, *, chunk, vocab, n_chunks):
    h = h_ref[...]
    tgt, lse, g = t_ref[...][:, None], lse_ref[...][:, None], g_ref[...][:, None]

    def body(c, dh):
        e_c = e_ref[pl.ds(c * chunk, chunk), :]
        dz = _dz(h, e_c, c, tgt, lse, g, chunk, vocab)
        return dh + jnp.dot(dz.astype(e_c.dtype), e_c, preferred_element_type=jnp.float32)

    dh = lax.fori_loop(0, n_chunks, body, jnp.zeros(h.shape, jnp.float32))
    dh_ref[...] = dh.astype(dh_ref.dtype)


def _de_kernel(h_ref, e_ref, t_ref, lse_ref, g_ref, de_ref, *, chunk, vocab, block_n, n_blocks):
    e_c = e_ref[...]  # [C, D]
    c = pl.program_id(0)

    def body(i, de):
        sl = pl.ds(i * block_n, block_n)
        h = h_ref[sl, :]
        dz = _dz(h, e_c, c, t_ref[sl][:, None], lse_ref[sl][:, None], g_ref[sl][:, None],
                 chunk, vocab)
        return de + lax.dot_general(dz.astype(h.dtype), h, (((0,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)

    de = lax.fori_loop(0, n_blocks, body, jnp.zeros(e_c.shape, jnp.float32))
    de_ref[...] = de.astype(de_ref.dtype)


def _kernel_call(kernel, grid, in_specs, out_specs, out_shape, interpret, name):
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=interpret, name=name,
                          compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _kernel_logprobs(h, e, t, cfg):
    return _kernel_fwd(h, e, t, cfg)[0]


def _kernel_fwd(h, e, t, cfg):
    chunk, vocab, bn, interpret = cfg
    n, d = h.shape
    tok = pl.BlockSpec((bn,), lambda i: (i,))
    lse, tl = _kernel_call(
        functools.partial(_fwd_kernel, chunk=chunk, vocab=vocab, n_chunks=e.shape[0] // chunk),
        (n // bn,),
        [pl.BlockSpec((bn, d), lambda i: (i, 0)), pl.BlockSpec(e.shape, lambda i: (0, 0)), tok],
        [tok, tok], [jax.ShapeDtypeStruct((n,), jnp.float32)] * 2, interpret, "logprobs_fwd",
    )(h, e, t)
    return tl - lse, (h, e, t, lse)


def _kernel_bwd(cfg, res, g):
    chunk, vocab, bn, interpret = cfg
    h, e, t, lse = res
    n, d = h.shape
    g = g.astype(jnp.float32)
    tok = pl.BlockSpec((bn,), lambda i: (i,))
    dh = _kernel_call(
        functools.partial(_dh_kernel, chunk=chunk, vocab=vocab, n_chunks=e.shape[0] // chunk),
        (n // bn,),
        [pl.BlockSpec((bn, d), lambda i: (i, 0)), pl.BlockSpec(e.shape, lambda i: (0, 0)),
         tok, tok, tok],
        pl.BlockSpec((bn, d), lambda i: (i, 0)), jax.ShapeDtypeStruct(h.shape, h.dtype),
        interpret, "logprobs_dh",
    )(h, e, t, lse, g)
    whole = pl.BlockSpec((n,), lambda c: (0,))
    de = _kernel_call(
        functools.partial(_de_kernel, chunk=chunk, vocab=vocab, block_n=bn, n_blocks=n // bn),
        (e.shape[0] // chunk,),
        [pl.BlockSpec(h.shape, lambda c: (0, 0)), pl.BlockSpec((chunk, d), lambda c: (c, 0)),
         whole, whole, whole],
        pl.BlockSpec((chunk, d), lambda c: (c, 0)), jax.ShapeDtypeStruct(e.shape, e.dtype),
        interpret, "logprobs_de",
    )(h, e, t, lse, g)
    return dh, de, None


_kernel_logprobs.defvjp(_kernel_fwd, _kernel_bwd)


def chunked_logprobs(
    hidden: jax.Array,  # [B, T, D]
    embedding: jax.Array,  # [V, D]
    targets: jax.Array,  # [B, T] int
    *,
    chunk_size: int = 128,
    block_tokens: int = 32,
    interpret: bool | None = None,
) -> jax.Array:
    """log softmax(hidden @ embedding^T)[targets]: [B, T] float32, Pallas kernels.

    `chunk_size` is the vocabulary tile and `block_tokens` the token tile
    (both rounded up to powers of two >= 16 for Triton). Differentiable in
    hidden and embedding. interpret=None runs the interpreter on CPU; on TPU
    this falls back to `chunked_logprobs_scan`.
    """
    _check(hidden, embedding, targets)
    platform = jax.default_backend()
    if platform == "tpu" and not interpret:
        return chunked_logprobs_scan(hidden, embedding, targets, chunk_size=max(chunk_size, 2048))
    interpret = platform == "cpu" if interpret is None else bool(interpret)
    b, t, d = hidden.shape
    vocab = embedding.shape[0]
    chunk = max(16, pl.next_power_of_2(min(chunk_size, vocab)))
    bn = max(16, pl.next_power_of_2(min(block_tokens, b * t)))
    n_p, v_p, d_p = _round_up(b * t, bn), _round_up(vocab, chunk), pl.next_power_of_2(d)
    # Zero padding: extra D columns change no dot product, extra vocabulary
    # rows are masked inside the tiles, extra tokens have zero cotangent.
    h = _pad_to(_pad_to(hidden.reshape(b * t, d), 0, n_p), 1, d_p)
    e = _pad_to(_pad_to(embedding, 0, v_p), 1, d_p)
    tg = _pad_to(targets.reshape(-1).astype(jnp.int32), 0, n_p)
    out = _kernel_logprobs(h, e, tg, (chunk, vocab, bn, interpret))
    return out[: b * t].reshape(b, t)


def token_logprobs(
    hidden: jax.Array,  # [B, T, D]
    embedding: jax.Array,  # [V, D]
    targets: jax.Array,  # [B, T] int
    *,
    impl: str = "chunked",
    chunk_size: int | None = None,
) -> jax.Array:
    """Per-token log-probs [B, T] by implementation name (one of LOGPROBS_IMPLS)."""
    if impl == "full":
        return full_logprobs(hidden, embedding, targets)
    if impl == "chunked":
        return chunked_logprobs_scan(hidden, embedding, targets, chunk_size=chunk_size or 8192)
    if impl == "chunked_kernel":
        return chunked_logprobs(hidden, embedding, targets, chunk_size=chunk_size or 128)
    raise ValueError(f"logprobs_impl must be one of {LOGPROBS_IMPLS}, got {impl!r}")
