"""Per-token log-probabilities and per-position KL terms, chunked over the vocabulary.

A 262,144-token vocabulary makes the float32 logits of a training batch the
largest tensor of the step (B*T*V*4 bytes: 8 x 2048 x 262144 x 4 B = 16 GiB).
The functions here never build them. They scan over the vocabulary in chunks
of `chunk_size` rows of the (tied) embedding / LM-head matrix and keep, per
position, an online log-sum-exp (running max m and rescaled sum s, as in
flash attention):

    m' = max(m, max_v z_v),   s' = s * exp(m - m') + sum_v exp(z_v - m'),
    lse = m + log s,          log p(y_t) = z_{y_t} - lse.

Each has a `jax.custom_vjp` whose backward pass recomputes one chunk of logits
at a time from the saved hidden states and log-sum-exps, so the gradient is
chunked too (peak extra memory is one [B*T, chunk_size] float32 block):

    d log p(y)/d z_v = 1[v = y] - p_v,        d lse/d z_v = p_v.

A vocabulary that `chunk_size` does not divide is padded with zero embedding
rows whose logits are masked to -inf (they add exp(-inf) = 0 to every sum).

`chunk_size=None` selects the 'full' implementation: plain `log_softmax` over
materialised float32 logits. It is the oracle the chunked path is tested
against, and the cheaper choice for small vocabularies.

Per-position KL (TDPO's sequential KL, distillation): for reference (teacher)
logits zq and policy (student) logits zp at one position,

    KL(q || p) = sum_v q_v (log q_v - log p_v)
               = E_q[zq - zp] - lse_q + lse_p,

and E_q[zq - zp] = A / s_q with A = sum_v exp(zq_v - m_q) (zq_v - zp_v)
accumulates online exactly like s_q (rescaled by exp(m_q - m_q') when the
running max moves), so one pass over the chunks gives KL with both
log-sum-exps. Its gradients are

    dKL/dzp_v = p_v - q_v,      dKL/dzq_v = q_v (log q_v - log p_v - KL).

Logit soft-capping (Gemma 2 style, z = c * tanh(raw / c)) is applied inside
the chunk, with dz/draw = 1 - (z / c)^2 in the backward pass.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "token_logprobs",
    "token_logprobs_from_logits",
    "sequence_logprobs",
    "token_kl",
    "token_kl_from_logits",
]

Array = jax.Array


# ----------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------


def _softcap(raw: Array, softcap: float | None) -> Array:
    if softcap is None:
        return raw
    return softcap * jnp.tanh(raw / softcap)


def _softcap_grad(raw: Array, g: Array, softcap: float | None) -> Array:
    """Chain rule through z = c tanh(raw / c): dz/draw = 1 - tanh(raw / c)^2."""
    if softcap is None:
        return g
    th = jnp.tanh(raw / softcap)
    return g * (1.0 - th * th)


def _chunked_embedding(embedding: Array, chunk_size: int) -> tuple[Array, Array]:
    """[V, D] -> ([K, C, D], starts [K]); pads V up to K*C with zero rows."""
    vocab, dim = embedding.shape
    n_chunks = -(-vocab // chunk_size)
    pad = n_chunks * chunk_size - vocab
    if pad:
        embedding = jnp.pad(embedding, ((0, pad), (0, 0)))
    chunks = embedding.reshape(n_chunks, chunk_size, dim)  # [K, C, D]
    starts = jnp.arange(n_chunks, dtype=jnp.int32) * chunk_size  # [K]
    return chunks, starts


def _chunk_logits(
    h: Array, emb_chunk: Array, start: Array, vocab: int, softcap: float | None
) -> tuple[Array, Array, Array]:
    """Logits of one vocabulary chunk: (raw [N, C], z [N, C] with pad -> -inf, valid [C])."""
    raw = jnp.einsum("nd,cd->nc", h, emb_chunk, preferred_element_type=jnp.float32)
    cols = start + jnp.arange(emb_chunk.shape[0], dtype=jnp.int32)  # [C]
    valid = cols < vocab  # [C]
    z = jnp.where(valid[None, :], _softcap(raw, softcap), -jnp.inf)
    return raw, z, valid


def _full_logits(h: Array, embedding: Array, softcap: float | None) -> Array:
    raw = jnp.einsum("nd,vd->nv", h, embedding, preferred_element_type=jnp.float32)
    return _softcap(raw, softcap)


def _resolve_chunk(chunk_size: int | None, vocab: int) -> int | None:
    if chunk_size is None:
        return None
    try:
        chunk = operator.index(chunk_size)
    except TypeError:
        chunk = 0
    if chunk <= 0:
        raise ValueError(f"chunk_size must be a positive int or None (full log_softmax), got {chunk_size!r}")
    return min(chunk, vocab)


def _flatten(hidden: Array, name: str) -> tuple[Array, tuple[int, ...]]:
    if hidden.ndim < 2:
        raise ValueError(f"{name} must be [..., D] (e.g. [B, T, D]), got shape {hidden.shape}")
    lead = hidden.shape[:-1]
    return hidden.reshape(-1, hidden.shape[-1]), lead


# ----------------------------------------------------------------------------
# token log-probs
# ----------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_lp(h: Array, embedding: Array, targets: Array, chunk_size: int, softcap: float | None):
    lp, lse, _ = _chunked_lp_fwd_impl(h, embedding, targets, chunk_size, softcap)
    return lp, lse


def _chunked_lp_fwd_impl(h, embedding, targets, chunk_size, softcap):
    n = h.shape[0]
    vocab = embedding.shape[0]
    chunks, starts = _chunked_embedding(embedding, chunk_size)

    def body(carry, xs):
        m, s, tgt = carry  # [N] each
        emb_chunk, start = xs
        _, z, _ = _chunk_logits(h, emb_chunk, start, vocab, softcap)  # [N, C]
        m_new = jnp.maximum(m, jnp.max(z, axis=1))
        # m starts at -inf; every chunk holds >= 1 real column, so m_new is finite.
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=1)
        local = targets - start
        # ids >= V would otherwise land on a padded (-inf) column of the last chunk
        in_chunk = (local >= 0) & (local < chunk_size) & (targets < vocab)
        picked = jnp.take_along_axis(z, jnp.clip(local, 0, chunk_size - 1)[:, None], axis=1)[:, 0]
        tgt = jnp.where(in_chunk, picked, tgt)
        return (m_new, s, tgt), None

    init = (
        jnp.full((n,), -jnp.inf, jnp.float32),
        jnp.zeros((n,), jnp.float32),
        jnp.zeros((n,), jnp.float32),
    )
    (m, s, tgt), _ = lax.scan(body, init, (chunks, starts))
    lse = m + jnp.log(s)
    return tgt - lse, lse, (h, embedding, targets, lse)


def _chunked_lp_fwd(h, embedding, targets, chunk_size, softcap):
    lp, lse, res = _chunked_lp_fwd_impl(h, embedding, targets, chunk_size, softcap)
    return (lp, lse), res


def _chunked_lp_bwd(chunk_size, softcap, res, cots):
    h, embedding, targets, lse = res
    g_lp, g_lse = cots  # [N] each
    g_lp = g_lp.astype(jnp.float32)
    g_lse = g_lse.astype(jnp.float32)
    vocab = embedding.shape[0]
    chunks, starts = _chunked_embedding(embedding, chunk_size)
    hf = h.astype(jnp.float32)

    def body(g_h, xs):
        emb_chunk, start = xs
        raw, z, _ = _chunk_logits(h, emb_chunk, start, vocab, softcap)
        p = jnp.exp(z - lse[:, None])  # [N, C]; padded columns give exactly 0
        cols = start + jnp.arange(chunk_size, dtype=jnp.int32)
        hit = (cols[None, :] == targets[:, None]) & (targets < vocab)[:, None]
        # d/dz_v [a * (z_y - lse) + b * lse] = a 1[v=y] + (b - a) p_v
        g_z = (g_lse - g_lp)[:, None] * p + jnp.where(hit, g_lp[:, None], 0.0)
        g_raw = _softcap_grad(raw, g_z, softcap)
        g_h = g_h + g_raw @ emb_chunk.astype(jnp.float32)  # [N, D]
        # each vocabulary row's gradient is complete within its chunk: cast now, keep [K, C, D] small
        g_emb = (g_raw.T @ hf).astype(embedding.dtype)  # [C, D]
        return g_h, g_emb

    g_h, g_emb = lax.scan(body, jnp.zeros(h.shape, jnp.float32), (chunks, starts))
    g_emb = g_emb.reshape(-1, embedding.shape[1])[:vocab]
    return g_h.astype(h.dtype), g_emb, None


_chunked_lp.defvjp(_chunked_lp_fwd, _chunked_lp_bwd)


def token_logprobs(
    hidden: Array,
    embedding: Array,
    targets: Array,
    *,
    chunk_size: int | None,
    softcap: float | None = None,
    return_lse: bool = False,
) -> Array | tuple[Array, Array]:
    """log p(targets) under logits = softcap(hidden @ embedding.T), without materialising [B, T, V].

    Args:
      hidden: final hidden states, [B, T, D] (any leading shape; the last axis is D).
      embedding: LM-head / tied embedding matrix, [V, D].
      targets: token ids, [B, T] (same leading shape as `hidden`). Ids outside
        [0, V) (padding, -100) give a finite meaningless value: mask them out.
      chunk_size: vocabulary rows per chunk; None = full log_softmax (oracle).
      softcap: final-logit soft-cap c (z = c tanh(raw / c)), or None.
      return_lse: also return the log-sum-exp log Z (for the z-loss).

    Returns:
      log-probs [B, T] in float32 (and lse [B, T] if `return_lse`).
    """
    h, lead = _flatten(hidden, "hidden")
    if targets.shape != lead:
        raise ValueError(f"targets shape {targets.shape} must equal hidden's leading shape {lead}")
    if embedding.ndim != 2 or embedding.shape[1] != h.shape[1]:
        raise ValueError(f"embedding must be [V, D={h.shape[1]}], got {embedding.shape}")
    t = targets.reshape(-1).astype(jnp.int32)
    chunk = _resolve_chunk(chunk_size, embedding.shape[0])
    if chunk is None:
        logits = _full_logits(h, embedding, softcap)  # [N, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, jnp.clip(t, 0, embedding.shape[0] - 1)[:, None], axis=-1)[:, 0]
        in_vocab = (t >= 0) & (t < embedding.shape[0])
        lp = jnp.where(in_vocab, picked, 0.0) - lse
    else:
        lp, lse = _chunked_lp(h, embedding, t, chunk, softcap)
    lp = lp.reshape(lead)
    if return_lse:
        return lp, lse.reshape(lead)
    return lp


def token_logprobs_from_logits(logits: Array, targets: Array, *, return_lse: bool = False):
    """log p(targets) from materialised logits [B, T, V] (plain log_softmax, float32)."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    vocab = logits.shape[-1]
    t = targets.astype(jnp.int32)
    picked = jnp.take_along_axis(logits, jnp.clip(t, 0, vocab - 1)[..., None], axis=-1)[..., 0]
    lp = jnp.where((t >= 0) & (t < vocab), picked, 0.0) - lse
    return (lp, lse) if return_lse else lp


def sequence_logprobs(token_lp: Array, mask: Array) -> tuple[Array, Array]:
    """Sum of per-token log-probs over the loss mask and the token count.

    Args:
      token_lp: [B, T] per-token log-probs (garbage allowed where mask is 0).
      mask: [B, T] loss mask (bool or 0/1); 1 on completion tokens.

    Returns:
      (sum [B] float32, count [B] float32).
    """
    m = mask.astype(bool)
    total = jnp.sum(jnp.where(m, token_lp.astype(jnp.float32), 0.0), axis=-1)
    count = jnp.sum(m, axis=-1).astype(jnp.float32)
    return total, count


# ----------------------------------------------------------------------------
# per-position KL(ref || policy)
# ----------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _chunked_kl(h, emb, hq, embq, chunk_size, softcap, ref_softcap, grad_ref):
    kl, _ = _chunked_kl_fwd_impl(h, emb, hq, embq, chunk_size, softcap, ref_softcap)
    return kl


def _chunked_kl_fwd_impl(h, emb, hq, embq, chunk_size, softcap, ref_softcap):
    n = h.shape[0]
    vocab = emb.shape[0]
    chunks, starts = _chunked_embedding(emb, chunk_size)
    qchunks, _ = _chunked_embedding(embq, chunk_size)

    def body(carry, xs):
        mp, sp, mq, sq, acc = carry
        c, cq, start = xs
        _, zp, valid = _chunk_logits(h, c, start, vocab, softcap)
        _, zq, _ = _chunk_logits(hq, cq, start, vocab, ref_softcap)
        mp_new = jnp.maximum(mp, jnp.max(zp, axis=1))
        sp = sp * jnp.exp(mp - mp_new) + jnp.sum(jnp.exp(zp - mp_new[:, None]), axis=1)
        mq_new = jnp.maximum(mq, jnp.max(zq, axis=1))
        scale = jnp.exp(mq - mq_new)
        wq = jnp.exp(zq - mq_new[:, None])  # unnormalised q, 0 on padding
        diff = jnp.where(valid[None, :], zq - zp, 0.0)  # -inf - -inf on padding -> 0
        sq = sq * scale + jnp.sum(wq, axis=1)
        acc = acc * scale + jnp.sum(wq * diff, axis=1)
        return (mp_new, sp, mq_new, sq, acc), None

    neg = jnp.full((n,), -jnp.inf, jnp.float32)
    zero = jnp.zeros((n,), jnp.float32)
    (mp, sp, mq, sq, acc), _ = lax.scan(body, (neg, zero, neg, zero, zero), (chunks, qchunks, starts))
    lse_p = mp + jnp.log(sp)
    lse_q = mq + jnp.log(sq)
    kl = acc / sq - lse_q + lse_p
    return kl, (h, emb, hq, embq, lse_p, lse_q, kl)


def _chunked_kl_fwd(h, emb, hq, embq, chunk_size, softcap, ref_softcap, grad_ref):
    return _chunked_kl_fwd_impl(h, emb, hq, embq, chunk_size, softcap, ref_softcap)


def _chunked_kl_bwd(chunk_size, softcap, ref_softcap, grad_ref, res, g):
    h, emb, hq, embq, lse_p, lse_q, kl = res
    g = g.astype(jnp.float32)
    vocab = emb.shape[0]
    chunks, starts = _chunked_embedding(emb, chunk_size)
    qchunks, _ = _chunked_embedding(embq, chunk_size)
    hf = h.astype(jnp.float32)
    hqf = hq.astype(jnp.float32)

    def body(carry, xs):
        g_h, g_hq = carry
        c, cq, start = xs
        rawp, zp, valid = _chunk_logits(h, c, start, vocab, softcap)
        rawq, zq, _ = _chunk_logits(hq, cq, start, vocab, ref_softcap)
        logp = zp - lse_p[:, None]
        logq = zq - lse_q[:, None]
        p = jnp.exp(logp)
        q = jnp.exp(logq)  # both exactly 0 on padding
        g_zp = g[:, None] * (p - q)
        g_rawp = _softcap_grad(rawp, g_zp, softcap)
        g_h = g_h + g_rawp @ c.astype(jnp.float32)
        g_emb = (g_rawp.T @ hf).astype(emb.dtype)  # complete per chunk (see _chunked_lp_bwd)
        if grad_ref:
            log_ratio = jnp.where(valid[None, :], logq - logp, 0.0)
            g_zq = g[:, None] * q * (log_ratio - kl[:, None])
            g_rawq = _softcap_grad(rawq, g_zq, ref_softcap)
            g_hq = g_hq + g_rawq @ cq.astype(jnp.float32)
            g_embq = (g_rawq.T @ hqf).astype(embq.dtype)
        else:
            g_embq = jnp.zeros((0,), embq.dtype)
        return (g_h, g_hq), (g_emb, g_embq)

    init = (jnp.zeros(h.shape, jnp.float32), jnp.zeros(hq.shape if grad_ref else (0,), jnp.float32))
    (g_h, g_hq), (g_emb, g_embq) = lax.scan(body, init, (chunks, qchunks, starts))
    g_emb = g_emb.reshape(-1, emb.shape[1])[:vocab]
    if grad_ref:
        g_embq = g_embq.reshape(-1, embq.shape[1])[:vocab]
        return g_h.astype(h.dtype), g_emb, g_hq.astype(hq.dtype), g_embq
    return g_h.astype(h.dtype), g_emb, None, None


_chunked_kl.defvjp(_chunked_kl_fwd, _chunked_kl_bwd)


def token_kl(
    hidden: Array,
    embedding: Array,
    ref_hidden: Array,
    ref_embedding: Array,
    *,
    chunk_size: int | None,
    softcap: float | None = None,
    ref_softcap: float | None = None,
    grad_ref: bool = False,
) -> Array:
    """Per-position forward KL(pi_ref(.|x, y<t) || pi(.|x, y<t)), chunked over the vocabulary.

    pi's logits are softcap(hidden @ embedding.T); pi_ref's are
    ref_softcap(ref_hidden @ ref_embedding.T). Used for TDPO's sequential KL
    (pi_ref = reference model) and for distillation (pi_ref = teacher,
    pi = student): KL = sum_v pi_ref(v) (log pi_ref(v) - log pi(v)).

    Args:
      hidden: policy / student hidden states [B, T, D].
      embedding: policy LM head [V, D].
      ref_hidden: reference / teacher hidden states [B, T, Dr] (Dr may differ from D).
      ref_embedding: reference LM head [V, Dr] (same vocabulary V).
      chunk_size: vocabulary rows per chunk; None = full log_softmax.
      softcap / ref_softcap: final-logit soft-caps of the two models.
      grad_ref: if False (default) the reference side is a constant: the
        chunked backward pass skips its gradient (returns zero). Set True to
        differentiate w.r.t. ref_hidden / ref_embedding too.

    Returns:
      KL per position, [B, T] float32 (>= 0 up to rounding).
    """
    h, lead = _flatten(hidden, "hidden")
    hq, lead_q = _flatten(ref_hidden, "ref_hidden")
    if lead != lead_q:
        raise ValueError(f"hidden leading shape {lead} != ref_hidden leading shape {lead_q}")
    if embedding.shape[0] != ref_embedding.shape[0]:
        raise ValueError(
            f"vocabulary mismatch: embedding has V={embedding.shape[0]} rows, "
            f"ref_embedding has V={ref_embedding.shape[0]}; KL needs one shared vocabulary"
        )
    if embedding.shape[1] != h.shape[1] or ref_embedding.shape[1] != hq.shape[1]:
        raise ValueError(
            f"embedding {embedding.shape} / ref_embedding {ref_embedding.shape} do not match "
            f"hidden D={h.shape[1]} / ref_hidden D={hq.shape[1]}"
        )
    chunk = _resolve_chunk(chunk_size, embedding.shape[0])
    if chunk is None:
        if not grad_ref:
            hq = lax.stop_gradient(hq)
            ref_embedding = lax.stop_gradient(ref_embedding)
        kl = _full_kl(_full_logits(h, embedding, softcap), _full_logits(hq, ref_embedding, ref_softcap))
    else:
        kl = _chunked_kl(h, embedding, hq, ref_embedding, chunk, softcap, ref_softcap, bool(grad_ref))
    return kl.reshape(lead)


def _full_kl(logits: Array, ref_logits: Array) -> Array:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logq = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(logq) * (logq - logp), axis=-1)


def token_kl_from_logits(logits: Array, ref_logits: Array) -> Array:
    """KL(softmax(ref_logits) || softmax(logits)) per position from materialised logits [..., V]."""
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {logits.shape} and ref_logits {ref_logits.shape} must have one shape")
    return _full_kl(logits, ref_logits)
