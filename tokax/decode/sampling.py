"""Logits processors and token sampling.

Each processor maps ``logits [B, V]`` (float32) to logits with excluded
tokens set to ``-inf``; they compose in the order HF transformers applies
them: temperature, top-k, top-p, min-p. Their parameters are arrays, not
Python constants, so changing them never recompiles; a processor whose
parameter disables it (top_k <= 0, top_p >= 1, min_p <= 0) is skipped with
``lax.cond`` and costs nothing at run time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

NEG_INF = -jnp.inf


@struct.dataclass
class SamplingParams:
    temperature: jax.Array  # [] float; 0 means greedy
    top_k: jax.Array  # [] int; <= 0 disables
    top_p: jax.Array  # [] float; >= 1 disables
    min_p: jax.Array  # [] float; <= 0 disables

    @classmethod
    def make(cls, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy)")
        if top_k < 0:
            raise ValueError(f"top_k={top_k} must be >= 0 (0 disables it)")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p} must be in (0, 1] (1 disables it)")
        if not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p={min_p} must be in [0, 1] (0 disables it)")
        return cls(
            temperature=jnp.asarray(temperature, jnp.float32),
            top_k=jnp.asarray(top_k, jnp.int32),
            top_p=jnp.asarray(top_p, jnp.float32),
            min_p=jnp.asarray(min_p, jnp.float32),
        )


def apply_temperature(logits: jax.Array, temperature: jax.Array) -> jax.Array:
    """logits / T (T = 0 is handled by greedy selection, so guard the divide)."""
    return logits / jnp.maximum(temperature, 1e-6)


def top_k_filter(logits: jax.Array, k: jax.Array) -> jax.Array:
    """Keep the k largest logits per row (ties at the k-th value are kept)."""

    def on(lg):
        srt = jnp.sort(lg, axis=-1)[..., ::-1]
        kth = jnp.take(srt, jnp.clip(k - 1, 0, lg.shape[-1] - 1), axis=-1)[..., None]
        return jnp.where(lg >= kth, lg, NEG_INF)

    return jax.lax.cond(k > 0, on, lambda lg: lg, logits)


def top_p_filter(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Nucleus: keep the smallest set of most likely tokens whose probability
    sums to at least top_p (always at least one token)."""

    def on(lg):
        srt = jnp.sort(lg, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(srt, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
        keep = before < top_p
        n_keep = jnp.maximum(keep.sum(-1), 1)
        cutoff = jnp.take_along_axis(srt, (n_keep - 1)[..., None], axis=-1)
        return jnp.where(lg >= cutoff, lg, NEG_INF)

    return jax.lax.cond(top_p < 1.0, on, lambda lg: lg, logits)


def min_p_filter(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Keep tokens with p >= min_p * max p."""

    def on(lg):
        logp = jax.nn.log_softmax(lg, axis=-1)
        thresh = jnp.max(logp, axis=-1, keepdims=True) + jnp.log(min_p)
        return jnp.where(logp >= thresh, lg, NEG_INF)

    return jax.lax.cond(min_p > 0.0, on, lambda lg: lg, logits)


def process_logits(logits: jax.Array, sp: SamplingParams) -> jax.Array:
    """The sampling distribution's logits: temperature, then top-k, top-p, min-p."""
    lg = apply_temperature(logits.astype(jnp.float32), sp.temperature)
    lg = top_k_filter(lg, sp.top_k)
    lg = top_p_filter(lg, sp.top_p)
    return min_p_filter(lg, sp.min_p)


def sample(rng: jax.Array, logits: jax.Array, sp: SamplingParams) -> jax.Array:
    """One token per row: argmax when temperature == 0, else a draw from the
    processed distribution. ``logits [B, V]`` -> ``[B]`` int32."""

    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        return jax.random.categorical(rng, process_logits(logits, sp), axis=-1).astype(jnp.int32)

    return jax.lax.cond(sp.temperature <= 0.0, greedy, draw, None)
