"""Logits processors against direct numpy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from tokax.decode import sampling as S


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_top_k(lg, k):
    out = np.full_like(lg, -np.inf)
    for b in range(lg.shape[0]):
        kth = np.sort(lg[b])[::-1][k - 1]
        out[b] = np.where(lg[b] >= kth, lg[b], -np.inf)
    return out


def np_top_p(lg, p):
    out = np.full_like(lg, -np.inf)
    for b in range(lg.shape[0]):
        order = np.argsort(-lg[b], kind="stable")
        probs = np_softmax(lg[b][order])
        keep, mass = [], 0.0
        for i, pr in zip(order, probs):  # add tokens until the mass reaches p
            keep.append(i)
            mass += pr
            if mass >= p:
                break
        out[b, keep] = lg[b, keep]
    return out


def np_min_p(lg, m):
    pr = np_softmax(lg)
    return np.where(pr >= m * pr.max(-1, keepdims=True), lg, -np.inf)


@pytest.fixture
def logits():
    return np.random.RandomState(0).randn(3, 50).astype(np.float32) * 2


@pytest.mark.parametrize("k", [1, 5, 50])
def test_top_k(logits, k):
    got = np.asarray(S.top_k_filter(jnp.asarray(logits), jnp.asarray(k)))
    np.testing.assert_array_equal(got, np_top_k(logits, k))


def test_top_k_zero_disables(logits):
    np.testing.assert_array_equal(np.asarray(S.top_k_filter(jnp.asarray(logits), jnp.asarray(0))), logits)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p(logits, p):
    got = np.asarray(S.top_p_filter(jnp.asarray(logits), jnp.asarray(p, jnp.float32)))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(np_top_p(logits, p)))


@pytest.mark.parametrize("m", [0.01, 0.2, 0.9])
def test_min_p(logits, m):
    got = np.asarray(S.min_p_filter(jnp.asarray(logits), jnp.asarray(m, jnp.float32)))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(np_min_p(logits, m)))


def test_composition_order(logits):
    sp = S.SamplingParams.make(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05)
    got = np.asarray(S.process_logits(jnp.asarray(logits), sp))
    ref = np_min_p(np_top_p(np_top_k(logits / 0.7, 20), 0.8), 0.05)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(got[fin], ref[fin], rtol=1e-6)


def test_greedy_is_argmax(logits):
    tok = S.sample(jax.random.PRNGKey(0), jnp.asarray(logits), S.SamplingParams.make())
    np.testing.assert_array_equal(np.asarray(tok), logits.argmax(-1))


def test_sampled_frequencies_match_processed_distribution():
    lg = np.random.RandomState(1).randn(1, 12).astype(np.float32)
    sp = S.SamplingParams.make(temperature=1.3, top_k=8, top_p=0.9)
    target = np_softmax(np_top_p(np_top_k(lg / 1.3, 8), 0.9))[0]
    n = 20000
    keys = jax.random.split(jax.random.PRNGKey(7), n)
    draws = jax.vmap(lambda k: S.sample(k, jnp.asarray(lg), sp))(keys)[:, 0]
    counts = np.bincount(np.asarray(draws), minlength=12)
    assert counts[target == 0].sum() == 0
    sup = target > 0
    expected = target[sup].astype(np.float64)
    p = stats.chisquare(counts[sup], n * expected / expected.sum()).pvalue
    assert p > 1e-3, p


@pytest.mark.parametrize(
    "kw,field", [({"temperature": -1}, "temperature"), ({"top_k": -2}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"min_p": 1.5}, "min_p")]
)
def test_bad_values_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        S.SamplingParams.make(**kw)
