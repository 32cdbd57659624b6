"""T-REG: Zhou et al. 2024, "T-REG: Preference Optimization with Token-Level Reward Regularization".

T-REG trains with DPO's sequence-level objective and adds a regularizer that
asks DPO's implicit token-level rewards,

    rho_t = beta * (log pi(y_t | x, y<t) - log pi_ref(y_t | x, y<t)),

to agree with token-level rewards r_t that the model generated for itself
by contrastive prompting (scoring the response under a prompt asking for a
better answer and one asking for a worse answer). The rewards are weak,
noisy supervision; they only regularize how the sequence reward is spread
over the tokens.

What is implemented here (the seeds hold the abstract only; check the
paper's own equation before comparing numbers with it):

    h        = sum_t m^w_t rho^w_t - sum_t m^l_t rho^l_t              (= beta Delta of DPO)
    L_DPO    = -log sigmoid(h)
    S(y)     = sum_t m_t r_t rho_t                                      (agreement of the two)
    L_REG    = -log sigmoid(S(y_w)) - log sigmoid(S(y_l))
    L        = mean_pairs [ L_DPO + alpha * L_REG ]

r_t is signed (positive: the token makes the response better, negative:
worse) and a constant (no gradient). Raising S(y) raises the implicit
reward of tokens with r_t > 0 and lowers it for r_t < 0, in the chosen and
in the rejected response alike, while the DPO term keeps the sequence-level
preference. alpha = 0 gives DPO on the same inputs.

`contrastive_token_rewards` builds r_t from the two contrastive-prompt
log-probs of each token; any other token-level reward can be passed instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tokax.train.losses.common import PreferenceBatch, pair_metrics, require, sg, to_float

Array = jax.Array

TOKEN_FIELDS = (
    "chosen_token_logratios",
    "rejected_token_logratios",
    "chosen_token_rewards",
    "rejected_token_rewards",
    "chosen_mask",
    "rejected_mask",
)


def contrastive_token_rewards(better_token_logps: Array, worse_token_logps: Array, mask: Array) -> Array:
    """Token rewards from contrastive prompting: r_t = 2 sigmoid(log p(y_t|x+, y<t) - log p(y_t|x-, y<t)) - 1.

    x+ / x- are the prompt wrapped in an instruction to improve / worsen the
    response (the same model, no training). r_t is in (-1, 1), positive when
    the "better" prompt makes the token more likely; 0 off the mask; detached.
    Shapes [B, T].
    """
    r = 2.0 * jax.nn.sigmoid(to_float(better_token_logps) - to_float(worse_token_logps)) - 1.0
    return jax.lax.stop_gradient(jnp.where(mask.astype(bool), r, 0.0))


def treg_loss(batch: PreferenceBatch, *, beta: float = 0.1, alpha: float = 1.0) -> tuple[Array, dict]:
    """T-REG (Zhou et al. 2024): DPO + alpha * token-reward agreement regularizer (module docstring).

    Needs the token fields of the batch: per-token log-ratios log pi - log
    pi_ref [B, T], token rewards [B, T] and completion masks [B, T] for the
    chosen and the rejected response. The gradient flows through the
    per-token log-ratios only.

    Metrics: the DPO metrics from the token sums, `treg/dpo_loss`,
    `treg/reg_loss`, `treg/agreement_chosen|rejected` (mean S(y)).
    """
    require(batch, TOKEN_FIELDS, "treg")
    mw, ml = batch.chosen_mask.astype(bool), batch.rejected_mask.astype(bool)
    rho_w = beta * jnp.where(mw, to_float(batch.chosen_token_logratios), 0.0)  # [B, T]
    rho_l = beta * jnp.where(ml, to_float(batch.rejected_token_logratios), 0.0)
    r_w = jax.lax.stop_gradient(jnp.where(mw, to_float(batch.chosen_token_rewards), 0.0))
    r_l = jax.lax.stop_gradient(jnp.where(ml, to_float(batch.rejected_token_rewards), 0.0))
    seq_w, seq_l = jnp.sum(rho_w, axis=-1), jnp.sum(rho_l, axis=-1)  # [B] sequence rewards
    dpo = -jax.nn.log_sigmoid(seq_w - seq_l)
    s_w, s_l = jnp.sum(r_w * rho_w, axis=-1), jnp.sum(r_l * rho_l, axis=-1)
    reg = -jax.nn.log_sigmoid(s_w) - jax.nn.log_sigmoid(s_l)
    loss = jnp.mean(dpo + alpha * reg)
    metrics = pair_metrics(seq_w, seq_l, batch)
    metrics.update(
        {
            "treg/dpo_loss": sg(jnp.mean(dpo)),
            "treg/reg_loss": sg(jnp.mean(reg)),
            "treg/agreement_chosen": sg(jnp.mean(s_w)),
            "treg/agreement_rejected": sg(jnp.mean(s_l)),
        }
    )
    return loss, metrics
