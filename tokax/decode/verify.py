"""Verifiers: how many of a row's drafts the target accepts, and the token
that follows them.

Inputs for a batch of rows: the target's logits at the ``K + 1`` positions
it scored in one pass, ``p_logits [B, K+1, V]`` (position i predicts the
token after the i-th draft; position 0 follows the last accepted token),
the drafts ``[B, K]``, how many of them are real ``n_draft [B]``, and the
draft logits ``q_logits [B, K, V]`` they were drawn from (``None`` for a
deterministic proposer: q is then one-hot on the draft). Output:
``n_acc [B]`` (0..n_draft) and ``next_token [B]``, the target's token after
the accepted drafts (the correction, or the bonus token when all passed).

Greedy (temperature 0): accept while ``argmax p_i == x_i``; the next token is
``argmax p_{n_acc}``, so the output equals plain greedy decoding.

Speculative sampling (Leviathan et al. 2023, Chen et al. 2023), with p and q
the *processed* distributions (``process_logits``: temperature, top-k,
top-p, min-p applied identically to both):

    accept x_i with probability min(1, p_i(x_i) / q_i(x_i))
    at the first rejection i: next ~ norm(max(0, p_i - q_i))
    if all n_draft pass:       next ~ p_{n_draft}

which makes every emitted token distributed exactly as p.

A verifier declares, as its ``greedy_path`` attribute, when its acceptance
depends only on the target's greedy tokens: ``ALWAYS`` (``greedy_verify``),
``AT_ZERO_TEMPERATURE`` (``verify``; the tree verifiers of
``tokax.decode.tree``), or nothing (it reads the full logits). The decode
loops read it (``greedy_path``) to take those tokens from the bfloat16 screen
(``tokax.model.screen``) instead of computing float32 logits; a verifier
without it, such as a custom or deliberately wrong rule, always gets logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tokax.decode.sampling import SamplingParams, process_logits

ALWAYS = "always"
AT_ZERO_TEMPERATURE = "at_zero_temperature"


def greedy_path(verifier) -> str | None:
    """``ALWAYS``, ``AT_ZERO_TEMPERATURE`` or None: when ``verifier`` needs only the target's
    greedy tokens (module docstring)."""
    mode = getattr(verifier, "greedy_path", None)
    if mode not in (None, ALWAYS, AT_ZERO_TEMPERATURE):
        raise ValueError(f"verifier {verifier!r}: greedy_path={mode!r} is not one of {ALWAYS!r}, "
                         f"{AT_ZERO_TEMPERATURE!r} or None")
    return mode


def leading_true(ok: jax.Array) -> jax.Array:
    """Length of the all-True prefix of each row of ``ok [B, K]`` -> ``[B]`` int32."""
    return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)


def _at(x: jax.Array, i: jax.Array) -> jax.Array:
    """``x[b, i[b]]`` for ``x [B, T, ...]``."""
    idx = i.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.take_along_axis(x, idx, axis=1)[:, 0]


def greedy_verify(p_logits, drafts, n_draft, q_logits=None, sp=None, rng=None):
    """Accept while the target's argmax equals the draft."""
    return greedy_accept(jnp.argmax(p_logits, axis=-1).astype(jnp.int32), drafts, n_draft)


def greedy_accept(top, drafts, n_draft):
    """Greedy verification from the target's greedy tokens ``top [B, K+1]``
    (what ``greedy_verify`` takes the argmax of the logits for)."""
    K = drafts.shape[1]
    ok = (top[:, :K] == drafts) & (jnp.arange(K)[None, :] < n_draft[:, None])
    n_acc = leading_true(ok)
    return n_acc, _at(top, n_acc)


def draft_probs(drafts: jax.Array, q_logits: jax.Array | None, V: int, sp: SamplingParams) -> jax.Array:
    """The processed draft distributions ``[B, K, V]`` (one-hot for deterministic drafts)."""
    if q_logits is None:
        return jax.nn.one_hot(drafts, V, dtype=jnp.float32)
    return jax.nn.softmax(process_logits(q_logits, sp), axis=-1)


def sampling_verify(p_logits, drafts, n_draft, q_logits, sp: SamplingParams, rng):
    """Speculative sampling: accept with min(1, p/q), resample from the residual."""
    B, K = drafts.shape
    V = p_logits.shape[-1]
    k_acc, k_next = jax.random.split(rng)
    p = jax.nn.softmax(process_logits(p_logits, sp), axis=-1)  # [B, K+1, V]
    q = draft_probs(drafts, q_logits, V, sp)  # [B, K, V]
    px = jnp.take_along_axis(p[:, :K], drafts[..., None], axis=-1)[..., 0]  # [B, K]
    qx = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(k_acc, (B, K))
    ok = (u * qx < px) & (jnp.arange(K)[None, :] < n_draft[:, None])  # u < p/q without dividing
    n_acc = leading_true(ok)
    p_n = _at(p, n_acc)  # [B, V]
    q_pad = jnp.concatenate([q, jnp.zeros((B, 1, V), q.dtype)], axis=1)
    rejected = n_acc < n_draft
    q_n = jnp.where(rejected[:, None], _at(q_pad, n_acc), 0.0)
    resid = jnp.maximum(p_n - q_n, 0.0)
    # In exact arithmetic a rejection leaves positive residual mass; guard float round-off.
    mass = resid.sum(-1, keepdims=True)
    dist = jnp.where(mass > 1e-12, resid, p_n)
    nxt = jax.random.categorical(k_next, jnp.log(dist), axis=-1).astype(jnp.int32)
    return n_acc, nxt


def verify(p_logits, drafts, n_draft, q_logits, sp: SamplingParams, rng):
    """Greedy verification when ``sp.temperature == 0``, speculative sampling otherwise."""
    return jax.lax.cond(
        sp.temperature <= 0.0,
        lambda: greedy_verify(p_logits, drafts, n_draft),
        lambda: sampling_verify(p_logits, drafts, n_draft, q_logits, sp, rng),
    )


greedy_verify.greedy_path = ALWAYS
verify.greedy_path = AT_ZERO_TEMPERATURE
