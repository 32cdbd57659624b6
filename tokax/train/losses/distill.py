"""Knowledge distillation: forward KL from the teacher's next-token distribution to the student's."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tokax.train.losses.common import TokenBatch, require, safe_div, sg, to_float

Array = jax.Array


def distill_loss(batch: TokenBatch, *, sft_weight: float = 0.0) -> tuple[Array, dict[str, Array]]:
    """Mean per-token forward KL(teacher || student) over the mask (Hinton et al. 2015).

    L = sum_{b,t} m_bt KL(p_T(.|x, y<t) || p_S(.|x, y<t)) / sum m_bt
        + sft_weight * NLL(y)

    with KL = sum_v p_T(v) (log p_T(v) - log p_S(v)) over the full
    vocabulary. The per-position KL comes from
    `tokax.train.logprobs.token_kl(student_hidden, student_emb, teacher_hidden,
    teacher_emb, chunk_size=...)`, chunked over the vocabulary in both the
    forward and backward pass; this function only reduces it. The optional
    hard-label term is the token-mean NLL of the data (`batch.token_logps`),
    as in Hinton et al.'s weighted sum of soft and hard targets (temperature
    1 here).

    Args:
      batch: TokenBatch with `token_kl` [B, T], `mask` [B, T] (and `token_logps` if sft_weight > 0).
      sft_weight: weight of the hard-label NLL term.

    Returns:
      (loss, metrics) with metrics `kl`, `nll`, `tokens`.
    """
    require(batch, ["token_kl"], "distill")
    m = batch.mask.astype(bool)
    kl = to_float(batch.token_kl)
    n_tok = jnp.sum(m).astype(kl.dtype)
    kl_mean = safe_div(jnp.sum(jnp.where(m, kl, 0.0)), n_tok)
    loss = kl_mean
    nll = jnp.zeros((), kl.dtype)
    if sft_weight:
        require(batch, ["token_logps"], "distill with sft_weight > 0")
        nll = safe_div(-jnp.sum(jnp.where(m, to_float(batch.token_logps), 0.0)), n_tok)
        loss = loss + sft_weight * nll
    return loss, {"kl": sg(kl_mean), "nll": sg(nll), "tokens": sg(n_tok)}
