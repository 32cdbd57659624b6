"""SimPO: Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tokax.train.losses.common import PreferenceBatch, check_label_smoothing, pair_metrics, safe_div, to_float

Array = jax.Array


def simpo_loss(
    batch: PreferenceBatch,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
) -> tuple[Array, dict]:
    """SimPO, Meng et al. 2024 (no reference model):

        L = -log sigmoid( beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma )

    with |y| the completion token count. This is TRL's CPOTrainer
    loss_type='simpo' (logits = avg_w - avg_l - gamma/beta, loss =
    -log sigmoid(beta * logits)); like TRL we allow label smoothing
    (-(1-e) log sigmoid(u) - e log sigmoid(-u)) and an optional NLL term on
    y_w (TRL's `cpo_alpha`; 0 in the SimPO paper), the token-mean NLL of the
    chosen completions over the batch. gamma is the paper's target reward
    margin (TRL's `simpo_gamma`). Rewards in the metrics are beta * avg log pi(y).
    """
    check_label_smoothing(label_smoothing, "simpo")
    cw, cl = to_float(batch.chosen_counts), to_float(batch.rejected_counts)
    avg_w = safe_div(to_float(batch.chosen_logps), cw)
    avg_l = safe_div(to_float(batch.rejected_logps), cl)
    u = beta * (avg_w - avg_l) - gamma
    losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(u) - label_smoothing * jax.nn.log_sigmoid(-u)
    loss = jnp.mean(losses)
    metrics = pair_metrics(beta * avg_w, beta * avg_l, batch)
    if sft_weight:
        nll = safe_div(-jnp.sum(to_float(batch.chosen_logps)), jnp.sum(cw))
        loss = loss + sft_weight * nll
        metrics["nll_loss"] = jax.lax.stop_gradient(nll)
    return loss, metrics
