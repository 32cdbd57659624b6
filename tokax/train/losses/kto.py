"""KTO: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tokax.train.losses.common import UnpairedBatch, masked_mean, sg, to_float

Array = jax.Array


def kto_kl_estimate(kl_logps: Array, ref_kl_logps: Array) -> Array:
    """KTO's reference point z0 = max(0, mean_i [log pi(y'_i|x_i) - log pi_ref(y'_i|x_i)]), detached.

    The caller builds mismatched pairs: for each prompt x_i of the batch an
    unrelated completion y'_i = y_{(i+1) mod B} (TRL shifts the completions
    by one within the batch), runs policy and reference on (x_i, y'_i) and
    passes the two [B] sequence log-prob sums here. The mean log-ratio is a
    biased but cheap estimate of KL(pi || pi_ref); it is clamped at 0 and
    never back-propagated through (KTO paper; TRL's `kto_loss`).
    Under data parallelism average it across devices (e.g. `lax.pmean`)
    before the clamp, as TRL gathers it.
    """
    z = jnp.mean(to_float(kl_logps) - to_float(ref_kl_logps))
    return jax.lax.stop_gradient(jnp.maximum(z, 0.0))


def kto_loss(
    batch: UnpairedBatch,
    *,
    kl_estimate: Array | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Array, dict]:
    """KTO (Ethayarajh et al. 2024), unpaired binary feedback:

        r = log pi(y|x) - log pi_ref(y|x)            (sequence sums)
        desirable:    L = lambda_D (1 - sigmoid(beta (r - z0)))
        undesirable:  L = lambda_U (1 - sigmoid(beta (z0 - r)))

    batch loss = mean over all B examples (TRL's `KTOTrainer`: the weighted
    per-example losses of both kinds concatenated and averaged). z0 =
    `kl_estimate` is the detached batch KL estimate from `kto_kl_estimate`
    (in log-ratio units; the paper's "sigmoid(r - z)" has beta folded into
    both). lambda_D / lambda_U are TRL's desirable_weight / undesirable_weight
    (the paper suggests lambda_D n_D / (lambda_U n_U) in [1, 4/3]).

    Metrics: rewards beta*r averaged over desirable (`rewards/chosen`) and
    undesirable (`rewards/rejected`) examples (0 if none), their margin,
    `rewards/accuracies` = fraction of examples on the right side of the
    reference point (desirable with r > z0, undesirable with r < z0),
    `logps/chosen|rejected`, `kl` (z0), `count/chosen|rejected`.
    """
    d = batch.desirable.astype(bool)
    r = to_float(batch.logps) - to_float(batch.ref_logps)
    z = jax.lax.stop_gradient(jnp.asarray(kl_estimate, r.dtype))
    loss_d = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (r - z)))
    loss_u = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z - r)))
    loss = jnp.mean(jnp.where(d, loss_d, loss_u))
    return loss, unpaired_metrics(beta * r, beta * z, d, batch) | {"kl": sg(z)}


def unpaired_metrics(rewards: Array, baseline: Array, d: Array, batch: UnpairedBatch) -> dict[str, Array]:
    """Metrics shared by KTO and BCO (stop-gradient); baseline in reward units."""
    rw, b = sg(rewards), sg(baseline)
    lp = sg(to_float(batch.logps))
    chosen, rejected = masked_mean(rw, d), masked_mean(rw, ~d)
    correct = jnp.where(d, rw > b, rw < b).astype(rw.dtype)
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": jnp.mean(correct),
        "logps/chosen": masked_mean(lp, d),
        "logps/rejected": masked_mean(lp, ~d),
        "count/chosen": jnp.sum(d).astype(rw.dtype),
        "count/rejected": jnp.sum(~d).astype(rw.dtype),
    }
