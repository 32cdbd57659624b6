"""Batch containers, validation and shared helpers for the training losses.

Every loss in this package is a pure function

    loss_fn(batch, **hyperparameters) -> (loss_scalar, metrics_dict)

where `batch` is one of three containers (all JAX pytrees, so they pass
through `jax.jit` / `jax.grad`):

- `TokenBatch`      per-token quantities of one completion: SFT, distillation.
- `PreferenceBatch` paired data (x, y_w, y_l): sequence log-prob sums and token
                    counts under the policy and the reference; TDPO's summed
                    sequential KL; T-REG's per-token log-ratios, token rewards
                    and masks. Fields a loss does not use may be None.
- `UnpairedBatch`   KTO / BCO: one completion per example with a
                    desirable / undesirable label.

A loss only sees log-probs, KL terms and masks (docs/architecture.md, "Layers");
computing them from the model is the train step's job
(`tokax.train.logprobs`).

Metrics are stop-gradient'ed float32 scalars with TRL's names
(`rewards/chosen`, `rewards/rejected`, `rewards/margins`,
`rewards/accuracies`, `logps/chosen`, `logps/rejected`, ...). Masked means
over an empty set are 0, never NaN, so that `check_finite` only fires on a
real numerical problem.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = [
    "TokenBatch",
    "PreferenceBatch",
    "UnpairedBatch",
    "LossInfo",
    "check_finite",
    "assert_finite",
]


# ----------------------------------------------------------------------------
# containers
# ----------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenBatch:
    """Per-token inputs of the token-level losses (SFT, distillation).

    Attributes:
      mask: [B, T] loss mask (1 on the tokens that count).
      token_logps: [B, T] log pi(y_t | x, y<t) of the targets (SFT; optional for distill).
      lse: [B, T] log-sum-exp log Z of the logits (only for SFT's z-loss).
      token_kl: [B, T] KL(teacher || student) per position (distillation),
        from `tokax.train.logprobs.token_kl`.
    """

    mask: Array
    token_logps: Array | None = None
    lse: Array | None = None
    token_kl: Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PreferenceBatch:
    """Per-example inputs of the paired preference losses.

    Sequence fields are [B]; `*_logps` are SUMS of per-token log-probs over
    the completion mask and `*_counts` the number of completion tokens (the
    length-normalised losses divide one by the other), both from
    `tokax.train.logprobs.sequence_logprobs`.

    Attributes:
      chosen_logps, rejected_logps: [B] log pi(y_w | x), log pi(y_l | x).
      chosen_counts, rejected_counts: [B] |y_w|, |y_l| (tokens in the mask).
      ref_chosen_logps, ref_rejected_logps: [B] under pi_ref (reference-based losses).
      chosen_kl, rejected_kl: [B] TDPO's D_SeqKL(x, y; pi_ref || pi) =
        sum over the completion mask of the per-position
        KL(pi_ref(.|x, y<t) || pi(.|x, y<t)) (`logprobs.token_kl`).
      chosen_token_logratios, rejected_token_logratios: [B, T] per-token
        log pi(y_t|.) - log pi_ref(y_t|.) (T-REG).
      chosen_token_rewards, rejected_token_rewards: [B, T] token-level target
        rewards (T-REG; e.g. from contrastive prompting, treated as constants).
      chosen_mask, rejected_mask: [B, T] completion masks for the token fields.
    """

    chosen_logps: Array
    rejected_logps: Array
    chosen_counts: Array
    rejected_counts: Array
    ref_chosen_logps: Array | None = None
    ref_rejected_logps: Array | None = None
    chosen_kl: Array | None = None
    rejected_kl: Array | None = None
    chosen_token_logratios: Array | None = None
    rejected_token_logratios: Array | None = None
    chosen_token_rewards: Array | None = None
    rejected_token_rewards: Array | None = None
    chosen_mask: Array | None = None
    rejected_mask: Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UnpairedBatch:
    """Per-example inputs of the unpaired losses (KTO, BCO).

    Attributes:
      logps: [B] log pi(y | x), summed over the completion mask.
      ref_logps: [B] log pi_ref(y | x).
      counts: [B] completion token counts (for validation and metrics).
      desirable: [B] bool, True for thumbs-up (desirable) completions.
    """

    logps: Array
    ref_logps: Array
    counts: Array
    desirable: Array


@dataclasses.dataclass(frozen=True)
class LossInfo:
    """What a registered loss needs from its caller.

    The train step reads these declarations (never the loss's name) to decide which
    models to run and which terms to compute.

    Attributes:
      kind: 'token' (TokenBatch), 'paired' (PreferenceBatch) or 'unpaired' (UnpairedBatch).
      required: batch fields that must not be None.
      needs_reference: whether a reference model must be run.
      extra_inputs: keyword arguments that are per-step arrays rather than
        fixed hyperparameters (KTO's `kl_estimate`, BCO's `delta`).
      paper: the paper the formula comes from.
      needs_teacher: a teacher model's per-token distribution: ``token_kl`` is
        KL(teacher || policy) per position (distillation; config.teacher).
      needs_kl_pairs: mismatched (prompt_i, completion_{i+1}) pairs run through policy
        and reference in the same forward, giving the `kl_estimate` input (KTO).
      needs_running_mean: loss state holding the running mean of the implicit
        rewards (`bco_rewards`), updated with each batch before the loss and
        passed as the `delta` input (BCO).
      needs_contrastive_rewards: per-token log-ratios and the reference's token
        rewards under the "better" / "worse" instruction prompts (T-REG; the
        train step's ``contrastive_prefixes``).
      needs_kl_grad: the per-sequence KL(pi_ref || pi) fields, with gradient
        through the policy (TDPO), computed even when KL logging is off.
      head_subset: the loss can train a draft head over a frequent-token subset of
        the vocabulary (config.head_vocab) and reports `top1_agree` on it.
    """

    kind: str
    required: tuple[str, ...]
    needs_reference: bool
    extra_inputs: tuple[str, ...] = ()
    paper: str = ""
    needs_teacher: bool = False
    needs_kl_pairs: bool = False
    needs_running_mean: bool = False
    needs_contrastive_rewards: bool = False
    needs_kl_grad: bool = False
    head_subset: bool = False


# ----------------------------------------------------------------------------
# numerics helpers
# ----------------------------------------------------------------------------


def to_float(x: Array) -> Array:
    """Promote to at least float32 (bf16 log-probs lose too much in the losses)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def safe_div(num: Array, den: Array) -> Array:
    """num / den with 0 where den == 0 (empty masked sets give 0, not NaN)."""
    den_ok = den != 0
    return jnp.where(den_ok, num / jnp.where(den_ok, den, 1), 0)


def masked_mean(x: Array, mask: Array) -> Array:
    m = mask.astype(x.dtype)
    return safe_div(jnp.sum(x * m), jnp.sum(m))


def log1mexp(x: Array) -> Array:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def sg(tree: Any) -> Any:
    return jax.lax.stop_gradient(tree)


def pair_metrics(chosen_rewards: Array, rejected_rewards: Array, batch: PreferenceBatch) -> dict[str, Array]:
    """TRL's standard metrics for a paired loss (all stop-gradient)."""
    cr, rr = sg(chosen_rewards), sg(rejected_rewards)
    return {
        "rewards/chosen": jnp.mean(cr),
        "rewards/rejected": jnp.mean(rr),
        "rewards/margins": jnp.mean(cr - rr),
        "rewards/accuracies": jnp.mean((cr > rr).astype(cr.dtype)),
        "logps/chosen": jnp.mean(sg(batch.chosen_logps)),
        "logps/rejected": jnp.mean(sg(batch.rejected_logps)),
    }


def require(batch: Any, fields: Sequence[str], loss: str) -> None:
    """Trace-time check that the fields a loss reads are present (not None)."""
    missing = [f for f in fields if getattr(batch, f) is None]
    if missing:
        raise ValueError(
            f"{loss} needs {type(batch).__name__} field(s) {missing} but they are None; "
            f"fill them in the train step (see tokax.train.logprobs)"
        )


def check_label_smoothing(label_smoothing: float, loss: str, upper: float = 0.5) -> None:
    if not (0.0 <= float(label_smoothing) < upper):
        raise ValueError(f"{loss}: label_smoothing must be in [0, {upper}), got {label_smoothing}")


# ----------------------------------------------------------------------------
# finiteness
# ----------------------------------------------------------------------------


def check_finite(loss: Array, metrics: Mapping[str, Array] | None = None) -> Array:
    """True iff the loss and every metric are finite; a traced bool, usable inside jit.

    Use it to skip an update (`jnp.where(ok, new_params, params)` /
    `optax.apply_if_finite`) or to count bad steps; call `assert_finite`
    on the host to get an error that names the culprit.
    """
    ok = jnp.all(jnp.isfinite(loss))
    for v in (metrics or {}).values():
        ok = ok & jnp.all(jnp.isfinite(v))
    return ok


def assert_finite(loss: Array, metrics: Mapping[str, Array] | None = None, *, step: int | None = None) -> None:
    """Host-side: raise FloatingPointError naming the non-finite loss / metrics."""
    bad = []
    if not np.all(np.isfinite(np.asarray(jax.device_get(loss)))):
        bad.append(f"loss={np.asarray(jax.device_get(loss))}")
    for k, v in (metrics or {}).items():
        a = np.asarray(jax.device_get(v))
        if not np.all(np.isfinite(a)):
            bad.append(f"{k}={a}")
    if bad:
        where = f" at step {step}" if step is not None else ""
        raise FloatingPointError(
            f"non-finite loss{where}: {', '.join(bad)}. Check for empty completions "
            f"(validate_batch), a learning rate that is too high, or beta / label_smoothing out of range"
        )
