"""Tree attention and Hydragen shared-prefix attention against the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokax.kernels import reference as ref
from tokax.kernels.tree_attention import merge_attention, shared_prefix_attention, tree_attention

TOL = dict(atol=2e-5, rtol=2e-5)


def _random_tree_mask(rng, t):
    """Ancestor-or-self mask of a random tree with node 0 as root (parents precede children)."""
    parent = [-1] + [int(rng.integers(0, i)) for i in range(1, t)]
    mask = np.zeros((t, t), bool)
    for i in range(t):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parent[j]
    return mask


def _normal(key, shape):
    return jax.random.normal(key, shape, jnp.float32)


@pytest.mark.parametrize(
    "b,t,s,h,kvh,d,backend,use_lengths",
    [(2, 7, 50, 4, 2, 16, "gpu", True),
     (3, 12, 40, 4, 1, 32, "gpu", False),
     (2, 5, 33, 2, 2, 16, "tpu", True)],
    ids=["gqa_lengths", "mqa_mask_with_holes", "tpu_composed"])
def test_tree_attention_matches_reference(b, t, s, h, kvh, d, backend, use_lengths):
    rng = np.random.default_rng(b * 100 + t)
    ks = jax.random.split(jax.random.PRNGKey(t), 5)
    q = _normal(ks[0], (b, t, h, d))
    ck, cv = _normal(ks[1], (b, s, kvh, d)), _normal(ks[2], (b, s, kvh, d))
    tk, tv = _normal(ks[3], (b, t, kvh, d)), _normal(ks[4], (b, t, kvh, d))
    tree = jnp.asarray(np.stack([_random_tree_mask(rng, t) for _ in range(b)]))
    lengths = jnp.asarray(rng.integers(0, s + 1, size=b)).at[0].set(s)
    if use_lengths:
        cache_mask = jnp.arange(s)[None, :] < lengths[:, None]
        kw = dict(cache_lengths=lengths)
    else:  # compacted cache with holes (rejected tokens not yet overwritten)
        cache_mask = jnp.asarray(rng.random((b, s)) < 0.7)
        kw = dict(cache_mask=cache_mask)
    full_mask = jnp.concatenate([jnp.broadcast_to(cache_mask[:, None], (b, t, s)), tree], -1)
    out, want = jax.jit(lambda *a: (
        tree_attention(*a, tree, block_k=16, backend=backend, **kw),
        ref.attention(a[0], jnp.concatenate([a[1], a[3]], 1), jnp.concatenate([a[2], a[4]], 1),
                      full_mask)))(q, ck, cv, tk, tv)
    np.testing.assert_allclose(out, want, **TOL)


def test_merge_attention_equals_attention_over_union():
    b, t, s, h, d = 2, 6, 30, 2, 16
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v = _normal(ks[0], (b, t, h, d)), _normal(ks[1], (b, s, h, d)), _normal(ks[2], (b, s, h, d))
    mask = jax.random.bernoulli(ks[3], 0.6, (b, t, s)).at[0, 0, :].set(False)  # one empty row
    split = 11

    @jax.jit
    def both(q, k, v):
        o1, l1 = ref.attention_with_lse(q, k[:, :split], v[:, :split], mask[..., :split])
        o2, l2 = ref.attention_with_lse(q, k[:, split:], v[:, split:], mask[..., split:])
        return merge_attention(o1, l1, o2, l2), ref.attention_with_lse(q, k, v, mask)

    (o, lse), (want_o, want_lse) = both(q, k, v)
    np.testing.assert_allclose(o, want_o, **TOL)
    np.testing.assert_allclose(lse, want_lse, **TOL)


def test_shared_prefix_matches_concatenated_attention_and_grads():
    b, t, p, s, h, kvh, d = 3, 4, 40, 12, 4, 2, 16
    ks = jax.random.split(jax.random.PRNGKey(3), 5)
    q = _normal(ks[0], (b, t, h, d))
    pk, pv = _normal(ks[1], (p, kvh, d)), _normal(ks[2], (p, kvh, d))
    sk, sv = _normal(ks[3], (b, s, kvh, d)), _normal(ks[4], (b, s, kvh, d))
    lengths = jnp.array([12, 9, 4])  # ragged suffixes; queries are each row's last t tokens
    qpos = p + lengths[:, None] - t + jnp.arange(t)[None]

    def reference(q, pk, pv, sk, sv):
        kk = jnp.concatenate([jnp.broadcast_to(pk[None], (b, p, kvh, d)), sk], 1)
        vv = jnp.concatenate([jnp.broadcast_to(pv[None], (b, p, kvh, d)), sv], 1)
        kpos = jnp.broadcast_to(jnp.arange(p + s), (b, p + s))
        valid = jnp.concatenate([jnp.ones((b, p), bool), jnp.arange(s)[None] < lengths[:, None]], 1)
        mask = ref.attention_mask(qpos, kpos, causal=True) & valid[:, None, :]
        return ref.attention(q, kk, vv, mask)

    def hydragen(q, pk, pv, sk, sv):
        return shared_prefix_attention(q, pk, pv, sk, sv, suffix_lengths=lengths, q_positions=qpos)

    w = jnp.sin(jnp.arange(b * t * h * d, dtype=jnp.float32)).reshape(b, t, h, d)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * w)  # noqa: E731
    args = (q, pk, pv, sk, sv)
    out, want, g, g_want = jax.jit(lambda *a: (
        hydragen(*a), reference(*a), jax.grad(loss(hydragen), range(5))(*a),
        jax.grad(loss(reference), range(5))(*a)))(*args)
    np.testing.assert_allclose(out, want, **TOL)
    for got, exp in zip(g, g_want):
        np.testing.assert_allclose(got, exp, atol=5e-5, rtol=5e-5)


def test_tree_kernel_lowers_for_gpu():
    b, t, s, h, kvh, d = 2, 8, 256, 8, 2, 64
    z = lambda *shape: jnp.zeros(shape, jnp.bfloat16)  # noqa: E731
    tree = jnp.tril(jnp.ones((b, t, t), bool))
    f = lambda *a: tree_attention(*a, tree, cache_lengths=jnp.array([100, 256]),  # noqa: E731
                                  backend="gpu", interpret=False)
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exp = jax.export.export(jax.jit(f), platforms=["cuda"], disabled_checks=checks)(
        z(b, t, h, d), z(b, s, kvh, d), z(b, s, kvh, d), z(b, t, kvh, d), z(b, t, kvh, d))
    assert "xla.gpu.triton" in exp.mlir_module()
