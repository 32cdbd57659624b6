"""Flash attention (Pallas, interpret mode on CPU) against the reference einsum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokax.kernels import reference as ref
from tokax.kernels.flash_attention import (
    _block_ranges,
    _Config,
    flash_attention,
    flash_attention_with_lse,
)

TOL = dict(atol=2e-5, rtol=2e-5)


def _inputs(seed, b, tq, tk, h, kvh, d, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (b, tq, h, d), dtype)
    k = jax.random.normal(ks[1], (b, tk, kvh, d), dtype)
    v = jax.random.normal(ks[2], (b, tk, kvh, d), dtype)
    return q, k, v


def _packed_segments(b, t, seed):
    """Sorted segment ids with random boundaries, as in packed training rows."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((b, t), np.int32)
    for r in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t), size=3, replace=False))
        for c in cuts:
            ids[r, c:] += 1
    return jnp.asarray(ids)


def _ref(q, k, v, *, causal, window, seg=None, kv_seg=None, qpos=None, kpos=None, scale=None):
    b, tq, tk = q.shape[0], q.shape[1], k.shape[1]
    if qpos is None:
        qpos = jnp.broadcast_to(jnp.arange(tq) + tk - tq, (b, tq))
    if kpos is None:
        kpos = jnp.broadcast_to(jnp.arange(tk), (b, tk))
    mask = ref.attention_mask(qpos, kpos, causal=causal, window=window,
                              q_segment_ids=seg, kv_segment_ids=kv_seg)
    return ref.attention_with_lse(q, k, v, mask, scale=scale)


# (batch, Tq, Tk, H, KVH, D, causal, window, segments): ragged lengths (not a
# multiple of the tile), grouped-query heads, windows, packed segments,
# decode-like Tq < Tk, non-causal.
CASES = [
    (2, 64, 64, 4, 4, 16, True, None, False),
    (2, 37, 37, 4, 2, 16, True, None, False),
    (1, 100, 100, 4, 1, 32, True, 9, False),
    (2, 77, 77, 2, 2, 16, True, None, True),
    (2, 90, 90, 6, 2, 24, True, 20, True),
    (1, 5, 70, 4, 2, 16, True, None, False),
    (2, 33, 48, 2, 1, 64, False, 6, False),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_forward_matches_reference(case):
    b, tq, tk, h, kvh, d, causal, window, segs = case
    q, k, v = _inputs(0, b, tq, tk, h, kvh, d)
    seg = _packed_segments(b, tq, 1) if segs else None

    @jax.jit  # one compile for kernel and oracle (interpret mode compiles slowly)
    def both(q, k, v):
        got = flash_attention_with_lse(q, k, v, causal=causal, window=window, segment_ids=seg,
                                       block_q=16, block_k=16)
        return got, _ref(q, k, v, causal=causal, window=window, seg=seg)

    (out, lse), (r_out, r_lse) = both(q, k, v)
    np.testing.assert_allclose(out, r_out, **TOL)
    np.testing.assert_allclose(lse, r_lse, **TOL)


def _loss(fn):
    # Uses both outputs so that the lse cotangent path is exercised too.
    def f(q, k, v):
        out, lse = fn(q, k, v)
        w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        return jnp.sum(out * w) + 0.3 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))
    return f


@pytest.mark.parametrize("case", [CASES[4], CASES[5], CASES[6]],
                         ids=["gqa_window_segments", "decode", "noncausal_window"])
def test_gradients_match_reference(case):
    b, tq, tk, h, kvh, d, causal, window, segs = case
    q, k, v = _inputs(2, b, tq, tk, h, kvh, d)
    seg = _packed_segments(b, tq, 3) if segs else None
    kern = _loss(lambda q, k, v: flash_attention_with_lse(
        q, k, v, causal=causal, window=window, segment_ids=seg, block_q=16, block_k=16))
    oracle = _loss(lambda q, k, v: _ref(q, k, v, causal=causal, window=window, seg=seg))
    got, want = jax.jit(lambda *a: (jax.grad(kern, (0, 1, 2))(*a),
                                     jax.grad(oracle, (0, 1, 2))(*a)))(q, k, v)
    for g, w, name in zip(got, want, "qkv"):
        np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5, err_msg=f"d{name}")


def test_tpu_variant_interpreted():
    """The Mosaic-style kernels (grid-axis accumulation, scalar prefetch)."""
    b, tq, tk, h, kvh, d, causal, window, segs = CASES[4]
    q, k, v = _inputs(4, b, tq, tk, h, kvh, d)
    seg = _packed_segments(b, tq, 5) if segs else None
    fn = lambda q, k, v: flash_attention_with_lse(  # noqa: E731
        q, k, v, causal=causal, window=window, segment_ids=seg, backend="tpu",
        block_q=16, block_k=32)
    oracle = lambda q, k, v: _ref(q, k, v, causal=causal, window=window, seg=seg)  # noqa: E731
    (out, lse), (r_out, r_lse), got, want = jax.jit(lambda *a: (
        fn(*a), oracle(*a), jax.grad(_loss(fn), (0, 1, 2))(*a),
        jax.grad(_loss(oracle), (0, 1, 2))(*a)))(q, k, v)
    np.testing.assert_allclose(out, r_out, **TOL)
    np.testing.assert_allclose(lse, r_lse, **TOL)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5)


def test_positions_scale_and_empty_rows():
    """Explicit positions (two packed documents restarting at 0), a custom
    scale, and query rows that see nothing (segment absent on the key side)."""
    b, t, h, d = 2, 40, 2, 16
    q, k, v = _inputs(6, b, t, t, h, h, d)
    pos = jnp.concatenate([jnp.arange(25), jnp.arange(15)])[None].repeat(b, 0)
    seg = jnp.concatenate([jnp.zeros(25, jnp.int32), jnp.ones(15, jnp.int32)])[None].repeat(b, 0)
    kv_seg = seg.at[1, 25:].set(7)  # row 1: the second document has no keys
    kw = dict(causal=True, window=8, segment_ids=seg, kv_segment_ids=kv_seg,
              q_positions=pos, kv_positions=pos, scale=0.37)
    (out, lse), (r_out, r_lse) = jax.jit(lambda q, k, v: (
        flash_attention_with_lse(q, k, v, block_q=16, block_k=16, **kw),
        _ref(q, k, v, causal=True, window=8, seg=seg, kv_seg=kv_seg, qpos=pos, kpos=pos,
             scale=0.37)))(q, k, v)
    np.testing.assert_allclose(out, r_out, **TOL)
    np.testing.assert_allclose(lse, r_lse, **TOL)
    assert np.all(np.asarray(out[1, 25:]) == 0.0) and np.all(np.isneginf(lse[1, :, 25:]))


def test_bfloat16_inputs():
    q, k, v = _inputs(8, 1, 64, 64, 4, 2, 32, jnp.bfloat16)
    out, want = jax.jit(lambda q, k, v: (
        flash_attention(q, k, v, window=20),
        _ref(*(x.astype(jnp.float32) for x in (q, k, v)), causal=True, window=20)[0]))(q, k, v)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("causal,window", [(True, None), (True, 24), (False, 10)])
def test_block_ranges_cover_every_visible_tile(causal, window):
    """The skipped tiles are exactly masked: brute force over the full mask."""
    b, t, bq, bk = 2, 128, 16, 32
    rng = np.random.default_rng(0)
    pos = jnp.asarray(np.sort(rng.integers(0, 200, size=(b, t)), axis=1), jnp.int32)
    seg = _packed_segments(b, t, 9)
    cfg = _Config(causal=causal, window=window, scale=1.0, block_q=bq, block_k=bk, kv_len=t,
                  groups=1, backend="gpu", interpret=True)
    (k_lo, k_hi), (q_lo, q_hi) = _block_ranges(pos, pos, seg, seg, cfg)
    mask = np.asarray(ref.attention_mask(pos, pos, causal=causal, window=window,
                                         q_segment_ids=seg))
    tiles = mask.reshape(b, t // bq, bq, t // bk, bk).any((2, 4))  # [B, nq, nk]
    skipped = 0
    for r in range(b):
        for i in range(t // bq):
            for j in range(t // bk):
                in_k = k_lo[r, i] <= j <= k_hi[r, i]
                in_q = q_lo[r, j] <= i <= q_hi[r, j]
                if tiles[r, i, j]:
                    assert in_k and in_q, (r, i, j)
                skipped += not in_k
    assert skipped > 0  # the summaries do prune with these masks


def test_bad_inputs_raise():
    q, k, v = _inputs(0, 1, 8, 8, 3, 2, 16)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        flash_attention(q, k, v)
    q, k, v = _inputs(0, 1, 8, 8, 2, 2, 16)
    with pytest.raises(ValueError, match="segment_ids must be"):
        flash_attention(q, k, v, segment_ids=jnp.zeros((1, 9), jnp.int32))


@pytest.mark.parametrize("backend,platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_lowers_for_accelerators(backend, platform):
    """Forward and backward lower through Triton / Mosaic (no device needed;
    this checks the kernels' shapes and ops, not the compiled code)."""
    q, k, v = _inputs(0, 1, 256, 256, 4, 2, 64, jnp.bfloat16)
    seg = jnp.zeros((1, 256), jnp.int32)

    def f(q, k, v):
        out = flash_attention(q, k, v, window=100, segment_ids=seg, backend=backend,
                              interpret=False)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exp = jax.export.export(jax.jit(jax.value_and_grad(f, (0, 1, 2))), platforms=[platform],
                            disabled_checks=checks)(q, k, v)
    text = exp.mlir_module()
    assert text.count("xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") >= 3
