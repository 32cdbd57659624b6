"""Supervised fine-tuning loss: mean token negative log-likelihood, with an optional z-loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tokax.train.losses.common import TokenBatch, require, safe_div, sg, to_float

Array = jax.Array


def sft_loss(batch: TokenBatch, *, z_loss: float = 0.0) -> tuple[Array, dict[str, Array]]:
    """Mean token NLL over the loss mask, plus the PaLM z-loss.

    L = -sum_{b,t} m_bt log pi(y_bt | x, y<t) / sum_{b,t} m_bt
        + z_loss * sum_{b,t} m_bt (log Z_bt)^2 / sum_{b,t} m_bt

    The mean is over all masked tokens of the batch (token-weighted, as
    HF / TRL's cross-entropy with ignore_index), not a mean of per-sequence
    means. The z-loss (Chowdhery et al. 2022, "PaLM", sec. 5; coefficient
    1e-4 there) pulls the log-partition log Z = logsumexp(logits) toward 0
    for stability; it needs `batch.lse` (`token_logprobs(..., return_lse=True)`).

    Args:
      batch: TokenBatch with `token_logps` [B, T], `mask` [B, T] (and `lse` if z_loss > 0).
      z_loss: z-loss coefficient (0 disables it).

    Returns:
      (loss, metrics) with metrics `nll`, `z_loss`, `tokens`.
    """
    require(batch, ["token_logps"], "sft")
    m = batch.mask.astype(bool)
    lp = to_float(batch.token_logps)
    n_tok = jnp.sum(m).astype(lp.dtype)
    nll = safe_div(-jnp.sum(jnp.where(m, lp, 0.0)), n_tok)
    loss = nll
    zl = jnp.zeros((), lp.dtype)
    if z_loss:
        require(batch, ["lse"], "sft with z_loss > 0")
        lse = to_float(batch.lse)
        zl = safe_div(jnp.sum(jnp.where(m, lse * lse, 0.0)), n_tok)
        loss = loss + z_loss * zl
    metrics = {"nll": sg(nll), "z_loss": sg(zl), "tokens": sg(n_tok)}
    return loss, metrics
