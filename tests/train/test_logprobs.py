"""Chunked per-token log-probs and per-position KL against the full log_softmax (values and grads)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokax.train.logprobs import (
    sequence_logprobs,
    token_kl,
    token_kl_from_logits,
    token_logprobs,
    token_logprobs_from_logits,
)

B, T, D, DQ, V = 2, 3, 4, 3, 50  # N = B*T = 6 rows; D, DQ small so V*D < N*V (see the memory test)


def _inputs(seed: int = 0, scale: float = 1.0):
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    h = scale * jax.random.normal(k[0], (B, T, D), jnp.float32)
    e = jax.random.normal(k[1], (V, D), jnp.float32)
    t = jax.random.randint(k[2], (B, T), 0, V)
    hq = scale * jax.random.normal(k[3], (B, T, DQ), jnp.float32)
    eq = jax.random.normal(k[4], (V, DQ), jnp.float32)
    w = jax.random.normal(k[5], (B, T), jnp.float32)  # cotangent weights
    return h, e, t, hq, eq, w


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_logits(h, e, softcap):
    z = np.asarray(h, np.float64) @ np.asarray(e, np.float64).T
    return z if softcap is None else softcap * np.tanh(z / softcap)


def _close(a, b, rel=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(1.0, float(np.max(np.abs(b))))
    np.testing.assert_allclose(a, b, rtol=0, atol=rel * scale)


@pytest.mark.parametrize("softcap", [None, 2.5])
def test_full_path_matches_numpy(softcap):
    h, e, t, hq, eq, _ = _inputs(1, scale=2.0)
    lp, lse = token_logprobs(h, e, t, chunk_size=None, softcap=softcap, return_lse=True)
    z = _np_logits(h, e, softcap)  # [B, T, V]
    ref = np.take_along_axis(_np_log_softmax(z), np.asarray(t)[..., None], -1)[..., 0]
    zmax = z.max(-1)
    ref_lse = zmax + np.log(np.exp(z - zmax[..., None]).sum(-1))
    _close(lp, ref)
    _close(lse, ref_lse)
    logq = _np_log_softmax(_np_logits(hq, eq, softcap))
    ref_kl = (np.exp(logq) * (logq - _np_log_softmax(z))).sum(-1)
    _close(token_kl(h, e, hq, eq, chunk_size=None, softcap=softcap, ref_softcap=softcap), ref_kl)
    # the from-logits helpers agree with the same oracle
    _close(token_logprobs_from_logits(jnp.asarray(z, jnp.float32), t), ref)
    zq = jnp.asarray(_np_logits(hq, eq, softcap), jnp.float32)
    _close(token_kl_from_logits(jnp.asarray(z, jnp.float32), zq), ref_kl)


# chunk sizes: 8 leaves a remainder (50 = 6*8 + 2), 10 divides, 64 > V is one chunk
@pytest.mark.parametrize("chunk_size", [8, 10, 64])
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_chunked_logprobs_match_full(chunk_size, softcap):
    h, e, t, _, _, w = _inputs(2, scale=2.0)

    def objective(h, e, chunk):
        lp, lse = token_logprobs(h, e, t, chunk_size=chunk, softcap=softcap, return_lse=True)
        # both outputs get a cotangent: lse through a z-loss-like square
        return jnp.sum(w * lp) + 1e-2 * jnp.sum(lse**2), (lp, lse)

    (_, (lp, lse)), g = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(h, e, chunk_size)
    (_, (lp0, lse0)), g0 = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(h, e, None)
    _close(lp, lp0)
    _close(lse, lse0)
    for a, b in zip(g, g0):
        assert a.shape == b.shape and a.dtype == b.dtype
        _close(a, b, rel=2e-5)


@pytest.mark.parametrize(
    "chunk_size,softcap,grad_ref", [(8, None, False), (8, 2.5, True), (10, None, True), (10, 2.5, False)]
)
def test_chunked_kl_matches_full(chunk_size, softcap, grad_ref):
    h, e, _, hq, eq, w = _inputs(3, scale=1.5)
    ref_cap = None if softcap is None else 4.0  # the two models may cap differently

    def objective(h, e, hq, eq, chunk):
        kl = token_kl(h, e, hq, eq, chunk_size=chunk, softcap=softcap, ref_softcap=ref_cap, grad_ref=grad_ref)
        return jnp.sum(w * kl), kl

    args = (h, e, hq, eq)
    (_, kl), g = jax.value_and_grad(objective, argnums=(0, 1, 2, 3), has_aux=True)(*args, chunk_size)
    (_, kl0), g0 = jax.value_and_grad(objective, argnums=(0, 1, 2, 3), has_aux=True)(*args, None)
    _close(kl, kl0)
    assert np.all(np.asarray(kl0) > 0)
    for a, b in zip(g, g0):
        _close(a, b, rel=2e-5)
    if not grad_ref:  # the reference side is a constant
        assert float(jnp.max(jnp.abs(g[2]))) == 0.0 and float(jnp.max(jnp.abs(g[3]))) == 0.0
    else:
        assert float(jnp.max(jnp.abs(g[3]))) > 0.0


def test_kl_of_a_model_with_itself_is_zero():
    h, e, _, _, _, _ = _inputs(4, scale=3.0)
    kl = token_kl(h, e, h, e, chunk_size=8)
    np.testing.assert_allclose(np.asarray(kl), 0.0, atol=2e-6)


def test_out_of_range_targets_are_finite_and_consistent():
    h, e, t, _, _, _ = _inputs(5)
    t = t.at[0, 0].set(-100).at[1, 2].set(V + 3)  # padding ids
    lp = token_logprobs(h, e, t, chunk_size=8)
    lp0 = token_logprobs(h, e, t, chunk_size=None)
    assert np.all(np.isfinite(np.asarray(lp)))
    _close(lp, lp0)
    # masked out by sequence_logprobs, they do not change the sum or its gradient
    mask = jnp.ones((B, T), bool).at[0, 0].set(False).at[1, 2].set(False)
    g = jax.grad(lambda h: sequence_logprobs(token_logprobs(h, e, t, chunk_size=8), mask)[0].sum())(h)
    assert float(jnp.max(jnp.abs(g[0, 0]))) == 0.0 and float(jnp.max(jnp.abs(g[1, 2]))) == 0.0


def test_sequence_logprobs_matches_numpy():
    rng = np.random.default_rng(0)
    lp = rng.normal(size=(3, 7)) - 2.0
    mask = rng.random((3, 7)) < 0.6
    mask[0] = False  # an empty row sums to 0 with count 0
    lp_garbage = np.where(mask, lp, np.nan)  # masked positions may hold anything
    total, count = sequence_logprobs(jnp.asarray(lp_garbage, jnp.float32), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(total), (lp * mask).sum(-1), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(count), mask.sum(-1))


def test_bf16_inputs():
    h, e, t, hq, eq, w = _inputs(6)
    hb, eb = h.astype(jnp.bfloat16), e.astype(jnp.bfloat16)
    lp = token_logprobs(hb, eb, t, chunk_size=8)
    assert lp.dtype == jnp.float32
    # same bf16 values, upcast: the chunked path computes in float32 internally
    _close(lp, token_logprobs(hb.astype(jnp.float32), eb.astype(jnp.float32), t, chunk_size=None))
    g = jax.grad(lambda h, e: jnp.sum(w * token_logprobs(h, e, t, chunk_size=8)), argnums=(0, 1))(hb, eb)
    assert g[0].dtype == jnp.bfloat16 and g[1].dtype == jnp.bfloat16
    g32 = jax.grad(lambda h, e: jnp.sum(w * token_logprobs(h, e, t, chunk_size=None)), argnums=(0, 1))(
        hb.astype(jnp.float32), eb.astype(jnp.float32)
    )
    for a, b in zip(g, g32):
        _close(np.asarray(a.astype(jnp.float32)), b, rel=1e-2)


def _max_intermediate(fn, *args) -> int:
    """Largest array (in elements) appearing anywhere in fn's jaxpr, including inside scans."""
    biggest = 0

    def walk(jaxpr):
        nonlocal biggest
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                shape = getattr(v.aval, "shape", ())
                biggest = max(biggest, int(np.prod(shape)) if shape else 1)
            for p in eqn.params.values():
                for sub in p if isinstance(p, (list, tuple)) else [p]:
                    if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return biggest


def test_chunked_paths_never_build_full_logits():
    h, e, t, hq, eq, w = _inputs(7)
    n_rows = B * T
    full_size = n_rows * V  # 300 elements; embedding [V, D] is 200, padded chunks 7*8*4 = 224

    def lp_loss(h, e, chunk):
        return jnp.sum(w * token_logprobs(h, e, t, chunk_size=chunk))

    def kl_loss(h, e, chunk):
        return jnp.sum(w * token_kl(h, e, hq, eq, chunk_size=chunk))

    for loss in (lp_loss, kl_loss):
        grad_fn = jax.grad(loss, argnums=(0, 1))
        assert _max_intermediate(lambda h, e: grad_fn(h, e, 8), h, e) < full_size
        # the check can fail: the full path does build [N, V]
        assert _max_intermediate(lambda h, e: grad_fn(h, e, None), h, e) >= full_size


def test_bad_arguments():
    h, e, t, hq, eq, _ = _inputs(8)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(h, e, t, chunk_size=0)
    with pytest.raises(ValueError, match="targets shape"):
        token_logprobs(h, e, t[:, :2], chunk_size=8)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        token_kl(h, e, hq, eq[:10], chunk_size=8)


def test_jit_and_large_logits_stable():
    # large logits: the online max keeps the log-sum-exp finite where exp would overflow
    h, e, t, _, _, _ = _inputs(9, scale=60.0)
    f = jax.jit(lambda h, e: token_logprobs(h, e, t, chunk_size=8))
    lp = f(h, e)
    assert np.all(np.isfinite(np.asarray(lp)))
    ref = np.take_along_axis(_np_log_softmax(_np_logits(h, e, None)), np.asarray(t)[..., None], -1)[..., 0]
    _close(lp, ref)
