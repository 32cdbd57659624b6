"""The trainer's log-prob dispatch: the Pallas chunked kernel (interpret mode)
gives the same per-sequence log-probs as the full softmax."""

import jax
import jax.numpy as jnp
import numpy as np

from tokax.model import config as mc
from tokax.model.decoder import init_params
from tokax.train.step import StepSpec, make_loss_fn


def test_chunked_kernel_matches_full_softmax(monkeypatch):
    import tokax.kernels.logprobs as klp

    calls = []
    real = klp.chunked_logprobs
    monkeypatch.setattr(klp, "chunked_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = mc.tiny(vocab_size=96)
    params = init_params(cfg, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda a: a * 0.3 if a.ndim == 2 and a.shape[0] == 96 else a, params)
    rs = np.random.RandomState(0)
    B, T = 2, 12
    mb = {
        "tokens": jnp.asarray(rs.randint(0, 96, (B, T))),
        "targets": jnp.asarray(rs.randint(0, 96, (B, T))),
        "positions": jnp.tile(jnp.arange(T), (B, 1)),
        "segment_ids": jnp.zeros((B, T), jnp.int32),
        "mask": jnp.asarray(rs.rand(B, T) > 0.3, jnp.float32),
    }
    out = {}
    for impl, chunk in (("auto", None), ("chunked_kernel", 32)):
        fn = make_loss_fn(StepSpec(model=cfg, loss="sft", logprob_chunk=chunk, logprobs_impl=impl, loss_kwargs=(("z_loss", 1e-2),)))
        loss, _ = fn(params, {}, mb, None)
        grads = jax.grad(lambda p: fn(p, {}, mb, None)[0])(params)
        out[impl] = (float(loss), grads)
    assert calls, "the chunked_kernel path never reached the Pallas kernel"
    assert abs(out["auto"][0] - out["chunked_kernel"][0]) < 1e-5 * max(1.0, abs(out["auto"][0]))
    for a, b in zip(jax.tree.leaves(out["auto"][1]), jax.tree.leaves(out["chunked_kernel"][1])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
