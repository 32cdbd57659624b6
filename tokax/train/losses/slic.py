"""Hinge preference loss, the rank-calibration loss of SLiC / SLiC-HF (Zhao et al. 2023)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tokax.train.losses.dpo import logratios
from tokax.train.losses.common import PreferenceBatch, pair_metrics

Array = jax.Array


def hinge_loss(batch: PreferenceBatch, *, beta: float = 0.1) -> tuple[Array, dict]:
    """SLiC hinge loss in TRL's form (loss_type='hinge'):  L = max(0, 1 - beta * Delta).

    SLiC-HF (Zhao et al. 2023, eq. 2) uses max(0, delta - log pi(y_w|x) +
    log pi(y_l|x)) without a reference model, with margin delta. TRL (and
    the DPO paper's discussion) normalise by the reference: Delta is the
    difference of log-ratios to pi_ref (sequence sums) and beta = 1/delta, so
    L = max(0, 1 - beta Delta) = beta * max(0, delta - Delta). We follow TRL
    (hinge as a reference-based loss).
    """
    lr_w, lr_l = logratios(batch)
    losses = jax.nn.relu(1.0 - beta * (lr_w - lr_l))
    return jnp.mean(losses), pair_metrics(beta * lr_w, beta * lr_l, batch)
