"""IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences"."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tokax.train.losses.common import PreferenceBatch, pair_metrics, require, safe_div, to_float

Array = jax.Array


def ipo_loss(batch: PreferenceBatch, *, beta: float = 0.1) -> tuple[Array, dict]:
    """IPO, Azar et al. 2023 eq. 17 (tau = beta):  L = (Delta_avg - 1 / (2 beta))^2.

    Delta_avg = [avg log pi(y_w) - avg log pi_ref(y_w)] - [avg log pi(y_l) - avg log pi_ref(y_l)]
    where avg log pi(y) = log pi(y|x) / |y| (length-averaged over the
    completion tokens, for the policy AND the reference). The paper writes
    sums; length averaging is TRL's convention (DPOTrainer divides all log-probs
    by the completion length when loss_type='ipo'), which we follow (the paper's
    squared loss on per-token averages). Equivalently (h/beta - 1/(2 beta))^2 with h = beta Delta_avg.
    Rewards in the metrics are beta * (avg log-ratio), also as in TRL.
    """
    require(batch, ("ref_chosen_logps", "ref_rejected_logps"), "ipo")
    cw, cl = to_float(batch.chosen_counts), to_float(batch.rejected_counts)
    lr_w = safe_div(to_float(batch.chosen_logps) - to_float(batch.ref_chosen_logps), cw)
    lr_l = safe_div(to_float(batch.rejected_logps) - to_float(batch.ref_rejected_logps), cl)
    losses = (lr_w - lr_l - 1.0 / (2.0 * beta)) ** 2
    return jnp.mean(losses), pair_metrics(beta * lr_w, beta * lr_l, batch)
