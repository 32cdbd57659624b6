"""T-REG: Zhou et al. 2024 (ACL 2025), "T-REG: Preference Optimization with Token-Level Reward Regularization", arXiv:2412.02685.

T-REG trains with DPO's sequence-level objective and adds a regularizer that
pulls DPO's implicit token-level rewards,

    rho_t = beta * (log pi(y_t | x, y<t) - log pi_ref(y_t | x, y<t)),

toward token-level rewards the model generates for itself by contrastive
prompting: the (frozen) reference scores each response token under a prompt
asking for a better response (x+) and under one asking for a worse one (x-),

    rhat_t = sigmoid(log pi_ref(y_t | x+, y<t) - log pi_ref(y_t | x-, y<t)) - 1/2   in (-1/2, 1/2).

The regularizer maximises the agreement sum_t rhat_t * rho_t of the two token
rewards on both responses, weighted per pair by the DPO gradient's own
sequence weight w = sigmoid(r(y_l) - r(y_w)) (no gradient through w), so it
acts most where DPO still gets the pair wrong:

    h      = sum_t m^w_t rho^w_t - sum_t m^l_t rho^l_t                (= the DPO margin)
    L_DPO  = -log sigmoid(h)
    L_REG(y) = -sum_t m_t rhat_t rho_t
    L      = mean_pairs [ L_DPO + alpha * sg(sigmoid(-h)) * (L_REG(y_w) + L_REG(y_l)) ]

The paper writes L_REG as the reward-weighted language-modelling loss
-sum_t beta rhat_t log pi(y_t | ...); that differs from -sum_t rhat_t rho_t
by beta sum_t rhat_t log pi_ref, a constant of the parameters, so the
gradients are identical (here the value also stays 0 at the reference).
The paper searches alpha in {0.1, 0.25, 0.5}. alpha = 0 gives DPO.

Sources: the abstract (seeds) and a published summary of the paper's
method section (the code repository was not reachable from here); the
contrastive prompts themselves are task-specific (see ``trainer.StepSpec``).
`contrastive_token_rewards` builds rhat_t from the two contrastive-prompt
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
    """Token rewards from contrastive prompting: rhat_t = sigmoid(log p(y_t|x+, y<t) - log p(y_t|x-, y<t)) - 1/2.

    x+ / x- are the prompt wrapped in an instruction to improve / worsen the
    response (the reference model, no training). rhat_t is in (-1/2, 1/2),
    positive when the "better" prompt makes the token more likely; 0 off the
    mask; detached. Shapes [B, T].
    """
    r = jax.nn.sigmoid(to_float(better_token_logps) - to_float(worse_token_logps)) - 0.5
    return jax.lax.stop_gradient(jnp.where(mask.astype(bool), r, 0.0))


def treg_loss(batch: PreferenceBatch, *, beta: float = 0.1, alpha: float = 1.0) -> tuple[Array, dict]:
    """T-REG (Zhou et al. 2024): DPO + alpha * w * token-reward agreement regularizer (module docstring).

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
    reg = -(s_w + s_l)  # L_REG(y_w) + L_REG(y_l)
    w = jax.lax.stop_gradient(jax.nn.sigmoid(seq_l - seq_w))  # DPO's own per-pair gradient weight
    loss = jnp.mean(dpo + alpha * w * reg)
    metrics = pair_metrics(seq_w, seq_l, batch)
    metrics.update(
        {
            "treg/dpo_loss": sg(jnp.mean(dpo)),
            "treg/reg_loss": sg(jnp.mean(reg)),
            "treg/seq_weight": sg(jnp.mean(w)),
            "treg/agreement_chosen": sg(jnp.mean(s_w)),
            "treg/agreement_rejected": sg(jnp.mean(s_l)),
        }
    )
    return loss, metrics
