"""Chunked log-probs (Pallas kernel and lax.scan) against full log_softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokax.kernels.logprobs import (
    chunked_logprobs,
    chunked_logprobs_scan,
    full_logprobs,
    token_logprobs,
)


def _inputs(seed, b, t, d, v, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    hidden = jax.random.normal(ks[0], (b, t, d), dtype)
    emb = (jax.random.normal(ks[1], (v, d)) * 0.7).astype(dtype)
    targets = jax.random.randint(ks[2], (b, t), 0, v)
    return hidden, emb, targets


def _numpy_logprobs(hidden, emb, targets):
    """Independent float64 oracle."""
    z = np.einsum("btd,vd->btv", np.float64(hidden), np.float64(emb))
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]


IMPLS = {
    "kernel": lambda h, e, t, c: chunked_logprobs(h, e, t, chunk_size=c, block_tokens=16),
    "scan": lambda h, e, t, c: chunked_logprobs_scan(h, e, t, chunk_size=c),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("b,t,d,v,chunk", [(2, 13, 24, 300, 64), (1, 40, 32, 1000, 256),
                                           (3, 5, 16, 50, 128)],
                         ids=["ragged_vocab", "more_tokens", "vocab_below_chunk"])
def test_values_and_grads_match_full_log_softmax(impl, b, t, d, v, chunk):
    hidden, emb, targets = _inputs(b + t, b, t, d, v)
    fn = lambda h, e: IMPLS[impl](h, e, targets, chunk)  # noqa: E731
    w = jnp.cos(jnp.arange(b * t, dtype=jnp.float32)).reshape(b, t)
    loss = lambda f: lambda h, e: jnp.sum(f(h, e) * w)  # noqa: E731
    full = lambda h, e: full_logprobs(h, e, targets)  # noqa: E731
    out, got, want = jax.jit(lambda h, e: (
        fn(h, e), jax.grad(loss(fn), (0, 1))(h, e), jax.grad(loss(full), (0, 1))(h, e)))(hidden, emb)
    np.testing.assert_allclose(out, _numpy_logprobs(hidden, emb, targets), atol=3e-5, rtol=1e-5)
    for g, r, name in zip(got, want, ("hidden", "embedding")):
        np.testing.assert_allclose(g, r, atol=3e-5, rtol=3e-5, err_msg=f"d{name}")


def test_dispatch_by_config_name_and_bf16():
    hidden, emb, targets = _inputs(0, 2, 8, 32, 200, jnp.bfloat16)
    want = _numpy_logprobs(hidden.astype(jnp.float32), emb.astype(jnp.float32), targets)
    for impl in ("chunked_kernel", "chunked", "full"):
        out = jax.jit(lambda h, e: token_logprobs(h, e, targets, impl=impl, chunk_size=64))(
            hidden, emb)
        assert out.dtype == jnp.float32 and out.shape == (2, 8)
        np.testing.assert_allclose(out, want, atol=2e-3, rtol=2e-3, err_msg=impl)
    with pytest.raises(ValueError, match="logprobs_impl must be one of"):
        token_logprobs(hidden, emb, targets, impl="fused")
    with pytest.raises(ValueError, match="targets must be"):
        chunked_logprobs_scan(hidden, emb, targets[:, :3])


def test_chunked_never_holds_full_logits():
    """Compiled temp memory of forward+backward: the scan holds one chunk, full holds [N, V]."""
    hidden, emb, targets = _inputs(0, 2, 128, 64, 32768)  # full logits: 32 MiB float32

    def temp_bytes(f):
        g = jax.grad(lambda h, e: f(h, e, targets).sum(), (0, 1))
        return jax.jit(g).lower(hidden, emb).compile().memory_analysis().temp_size_in_bytes

    full_logits = 2 * 128 * 32768 * 4
    assert temp_bytes(full_logprobs) >= full_logits
    assert temp_bytes(lambda h, e, t: chunked_logprobs_scan(h, e, t, chunk_size=1024)) < full_logits / 4


def test_kernel_lowers_for_gpu():
    hidden, emb, targets = _inputs(0, 2, 64, 640, 4096, jnp.bfloat16)
    g = jax.grad(lambda h, e: chunked_logprobs(h, e, targets, interpret=False).sum(), (0, 1))
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exp = jax.export.export(jax.jit(g), platforms=["cuda"], disabled_checks=checks)(hidden, emb)
    assert exp.mlir_module().count("xla.gpu.triton") >= 3
