"""ORPO: Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model"."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tokax.train.losses.common import PreferenceBatch, log1mexp, pair_metrics, safe_div, sg, to_float

Array = jax.Array


def orpo_loss(batch: PreferenceBatch, *, lam: float = 0.1) -> tuple[Array, dict]:
    """ORPO, Hong et al. 2024 (no reference model):

        L = L_SFT - lam * mean_pairs log sigmoid( log odds(y_w) - log odds(y_l) ),
        odds(y) = P(y|x) / (1 - P(y|x)),  log P(y|x) = (1/|y|) sum_t log pi(y_t|x, y<t)

    i.e. log odds = a - log(1 - exp(a)) with a the mean token log-prob
    (computed with a stable log1mexp). Following TRL's ORPOTrainer: lam is
    TRL's `beta`; L_SFT is the cross-entropy of the chosen completions,
    averaged over all chosen tokens in the batch (token-weighted); the reward
    metrics are lam * a. Extra metrics: `nll_loss`, `log_odds_ratio`
    (mean log sigmoid of the log-odds gap), `log_odds_chosen` (mean gap).
    """
    cw, cl = to_float(batch.chosen_counts), to_float(batch.rejected_counts)
    avg_w = safe_div(to_float(batch.chosen_logps), cw)
    avg_l = safe_div(to_float(batch.rejected_logps), cl)
    log_odds = (avg_w - avg_l) - (log1mexp(avg_w) - log1mexp(avg_l))
    ratio = jax.nn.log_sigmoid(log_odds)
    nll = safe_div(-jnp.sum(to_float(batch.chosen_logps)), jnp.sum(cw))
    loss = nll - lam * jnp.mean(ratio)
    metrics = pair_metrics(lam * avg_w, lam * avg_l, batch)
    metrics["nll_loss"] = sg(nll)
    metrics["log_odds_ratio"] = sg(jnp.mean(ratio))
    metrics["log_odds_chosen"] = sg(jnp.mean(log_odds))
    return loss, metrics
