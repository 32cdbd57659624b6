"""TDPO: Zeng et al. 2024, "Token-level Direct Preference Optimization" (ICML 2024).

TDPO adds to DPO's margin the sequential forward KL of each completion,

    D_SeqKL(x, y; pi_ref || pi) = sum_t KL(pi_ref(.|x, y<t) || pi(.|x, y<t)),

a sum over the completion positions of a full-vocabulary KL. The caller
computes it with `tokax.train.logprobs.token_kl(policy_hidden, policy_emb,
ref_hidden, ref_emb, chunk_size=...)` (chunked over the vocabulary) and
sums it over the completion mask (`sequence_logprobs(token_kl, mask)[0]`);
the results go in `PreferenceBatch.chosen_kl / rejected_kl`.

With u = [log pi/pi_ref](y_w) - [log pi/pi_ref](y_l) (sequence sums):

    TDPO1:  L = -log sigmoid( beta * (u - (D_SeqKL(y_l) - D_SeqKL(y_w))) )
    TDPO2:  L = -log sigmoid( beta * (u - alpha * (D_SeqKL(y_l) - sg(D_SeqKL(y_w)))) )

where sg is stop-gradient (TDPO2 stops the gradient through the chosen
KL and scales the KL gap by alpha). This is the paper's eqs. for TDPO1 /
TDPO2 and the authors' code (`tdpo_loss` in
Vance0124/Token-level-Direct-Preference-Optimization, KL summed, not
averaged, over positions). TRL has no TDPO.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tokax.train.losses.common import PreferenceBatch, pair_metrics, require, sg, to_float
from tokax.train.losses.dpo import logratios

Array = jax.Array

KL_FIELDS = ("chosen_kl", "rejected_kl")


def _tdpo(batch: PreferenceBatch, beta: float, alpha: float, stop_chosen_kl: bool, name: str):
    require(batch, KL_FIELDS, name)
    lr_w, lr_l = logratios(batch)
    kl_w, kl_l = to_float(batch.chosen_kl), to_float(batch.rejected_kl)
    if stop_chosen_kl:
        kl_w = jax.lax.stop_gradient(kl_w)
    logits = (lr_w - lr_l) - alpha * (kl_l - kl_w)
    losses = -jax.nn.log_sigmoid(beta * logits)
    metrics = pair_metrics(beta * lr_w, beta * lr_l, batch)
    metrics.update({"kl/chosen": sg(jnp.mean(kl_w)), "kl/rejected": sg(jnp.mean(kl_l))})
    return jnp.mean(losses), metrics


def tdpo1_loss(batch: PreferenceBatch, *, beta: float = 0.1) -> tuple[Array, dict]:
    """TDPO1 (Zeng et al. 2024): -log sigmoid(beta (u - (D_SeqKL(y_l) - D_SeqKL(y_w)))).

    Needs chosen_kl / rejected_kl (summed sequential KL(pi_ref || pi)).
    Metrics add `kl/chosen`, `kl/rejected` (batch means of D_SeqKL); rewards
    are the DPO implicit rewards beta * log pi/pi_ref.
    """
    return _tdpo(batch, beta, 1.0, False, "tdpo1")


def tdpo2_loss(batch: PreferenceBatch, *, beta: float = 0.1, alpha: float = 0.5) -> tuple[Array, dict]:
    """TDPO2 (Zeng et al. 2024): -log sigmoid(beta (u - alpha (D_SeqKL(y_l) - sg(D_SeqKL(y_w))))).

    alpha scales the KL gap (the paper's default 0.5); the chosen KL gets no
    gradient. Metrics as in `tdpo1_loss`.
    """
    return _tdpo(batch, beta, alpha, True, "tdpo2")
