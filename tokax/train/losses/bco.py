"""BCO: Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment"."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tokax.train.losses.common import UnpairedBatch, sg, to_float
from tokax.train.losses.kto import unpaired_metrics

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RunningMean:
    """BCO's reward shift state: the mean of every implicit reward seen so far."""

    mean: Array
    count: Array

    @staticmethod
    def init() -> "RunningMean":
        return RunningMean(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))


def bco_rewards(batch: UnpairedBatch, *, beta: float = 0.1) -> Array:
    """Implicit rewards beta * (log pi(y|x) - log pi_ref(y|x)), [B]."""
    return beta * (to_float(batch.logps) - to_float(batch.ref_logps))


def update_running_mean(state: RunningMean, values: Array, weights: Array | None = None) -> RunningMean:
    """Fold a batch of values into the running mean (exact, count-weighted; pure).

    mean' = mean + (batch_mean - mean) * n_batch / (count + n_batch),
    TRL's `RunningMoments.update` for the mean. Values are detached.
    Under data parallelism psum the batch sum and count first.
    """
    v = jax.lax.stop_gradient(to_float(values))
    w = jnp.ones_like(v) if weights is None else to_float(weights)
    n = jnp.sum(w)
    batch_mean = jnp.sum(v * w) / jnp.maximum(n, 1e-12)
    total = state.count + n
    mean = state.mean + (batch_mean - state.mean) * n / jnp.maximum(total, 1e-12)
    return RunningMean(mean.astype(state.mean.dtype), total.astype(state.count.dtype))


def bco_loss(batch: UnpairedBatch, *, delta: Array | float, beta: float = 0.1) -> tuple[Array, dict]:
    """BCO (Jung et al. 2024): a logistic classifier whose logit is the shifted implicit reward.

        r = beta (log pi(y|x) - log pi_ref(y|x))      (sequence sums)
        desirable:    L = -log sigmoid(r - delta)
        undesirable:  L = -log sigmoid(-(r - delta))

    batch loss = mean over all B examples (TRL's `BCOTrainer.bco_loss` +
    `losses.nanmean()`). delta is the reward shift: the running mean of all
    implicit rewards (desirable and undesirable) seen in training, INCLUDING
    this batch. TRL updates it before computing the loss, so the caller does

        state = update_running_mean(state, bco_rewards(batch, beta=beta))
        loss, metrics = bco_loss(batch, delta=state.mean, beta=beta)

    (in eval, skip the update). delta is a constant for the gradient.
    Not implemented: the paper's underlying-distribution matching (UDM)
    density-ratio weights on undesirable examples, which need a separate
    prompt classifier. Metrics as KTO's, with `delta` and the accuracy
    measured against delta.
    """
    d = batch.desirable.astype(bool)
    r = bco_rewards(batch, beta=beta)
    dl = jax.lax.stop_gradient(jnp.asarray(delta, r.dtype))
    losses = jnp.where(d, -jax.nn.log_sigmoid(r - dl), -jax.nn.log_sigmoid(-(r - dl)))
    return jnp.mean(losses), unpaired_metrics(r, dl, d, batch) | {"delta": sg(dl)}
