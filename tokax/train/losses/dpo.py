"""DPO and its label-noise variants: conservative DPO (label smoothing) and robust DPO.

Notation: for a pair (x, y_w, y_l),
    Delta = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
with sequence log-probs SUMMED over the completion tokens, and the implicit
reward r(x, y) = beta (log pi(y|x) - log pi_ref(y|x)), so beta * Delta =
r(x, y_w) - r(x, y_l) = h. The batch loss is the mean over pairs.
Formulas follow TRL's `DPOTrainer.dpo_loss` (loss_type 'sigmoid' with
`label_smoothing`, and 'robust'), which match the papers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tokax.train.losses.common import PreferenceBatch, check_label_smoothing, pair_metrics, require, to_float

Array = jax.Array

REF_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")


def logratios(batch: PreferenceBatch) -> tuple[Array, Array]:
    """Per-pair log pi/pi_ref of the chosen and the rejected completion (sums), [B] each."""
    require(batch, REF_FIELDS, "a reference-based loss")
    chosen = to_float(batch.chosen_logps) - to_float(batch.ref_chosen_logps)
    rejected = to_float(batch.rejected_logps) - to_float(batch.ref_rejected_logps)
    return chosen, rejected


def _sigmoid_dpo(batch: PreferenceBatch, beta: float, label_smoothing: float):
    lr_w, lr_l = logratios(batch)
    h = beta * (lr_w - lr_l)
    losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(h) - label_smoothing * jax.nn.log_sigmoid(-h)
    return jnp.mean(losses), pair_metrics(beta * lr_w, beta * lr_l, batch)


def dpo_loss(batch: PreferenceBatch, *, beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[Array, dict]:
    """DPO, Rafailov et al. 2023, eq. 7:  L = -log sigmoid(beta * Delta).

    With label_smoothing e > 0 this is conservative DPO (cDPO, Mitchell
    2023): L = -(1 - e) log sigmoid(beta Delta) - e log sigmoid(-beta Delta),
    TRL's loss_type='sigmoid'.

    Args:
      batch: PreferenceBatch with policy and reference sequence log-prob sums.
      beta: KL temperature (0.1 - 0.5 typical).
      label_smoothing: assumed probability e in [0, 0.5) that a label is flipped.
    """
    check_label_smoothing(label_smoothing, "dpo")
    return _sigmoid_dpo(batch, beta, label_smoothing)


def cdpo_loss(batch: PreferenceBatch, *, beta: float = 0.1, label_smoothing: float = 0.1) -> tuple[Array, dict]:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"):

    L = -(1 - e) log sigmoid(beta Delta) - e log sigmoid(-beta Delta),

    i.e. DPO's cross-entropy against soft targets (1 - e, e). Same as
    `dpo_loss(..., label_smoothing=e)`; TRL loss_type='sigmoid'.
    """
    check_label_smoothing(label_smoothing, "cdpo")
    return _sigmoid_dpo(batch, beta, label_smoothing)


def robust_dpo_loss(batch: PreferenceBatch, *, beta: float = 0.1, label_smoothing: float = 0.1) -> tuple[Array, dict]:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback"):

    with l(h) = -log sigmoid(h) and flip rate e < 1/2, the unbiased loss
        L = [(1 - e) l(beta Delta) - e l(-beta Delta)] / (1 - 2e)
          = [-(1 - e) log sigmoid(beta Delta) + e log sigmoid(-beta Delta)] / (1 - 2e),
    TRL's loss_type='robust' exactly. Its expectation under e-noisy labels
    equals the clean DPO loss. e = 0 gives DPO.
    """
    check_label_smoothing(label_smoothing, "robust_dpo")
    e = label_smoothing
    lr_w, lr_l = logratios(batch)
    h = beta * (lr_w - lr_l)
    losses = (-(1.0 - e) * jax.nn.log_sigmoid(h) + e * jax.nn.log_sigmoid(-h)) / (1.0 - 2.0 * e)
    return jnp.mean(losses), pair_metrics(beta * lr_w, beta * lr_l, batch)
