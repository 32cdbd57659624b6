"""Training hooks (slow: gradient compiles): the Kangaroo adapter (distillation from the frozen target)
and the SpecDec++ acceptance head (BCE against acceptance probabilities)
learn on tiny data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.decode.test_speculative import model_params
from tokax.decode import proposers as P
from tokax.decode.proposers import kangaroo, specdec_pp
from tokax.decode.sampling import SamplingParams, process_logits
from tokax.model import config as mc
from tokax.model.decoder import forward_jit

V = 16


@pytest.fixture(scope="module")
def models():
    cfg = mc.tiny(vocab_size=V)
    dcfg = mc.tiny(vocab_size=V, n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, ffn_dim=32)
    return cfg, model_params(cfg, seed=1), dcfg, model_params(dcfg, seed=2)


def batches(seed, n, shape=(16, 24)):
    rs = np.random.RandomState(seed)
    return [rs.randint(0, V, size=shape).astype(np.int32) for _ in range(n)]


@pytest.mark.slow
def test_kangaroo_adapter_distillation_lowers_kl(models):
    cfg, params, _, _ = models
    prop = P.KangarooProposer.make(cfg, n_shallow=1, k=4)
    adapter = kangaroo.init_adapter(cfg, 1, jax.random.PRNGKey(0), identity=True)
    held_out = jnp.asarray(batches(99, 1)[0])
    kl = jax.jit(lambda a: kangaroo.distill_loss(prop, cfg, params, a, held_out))
    before = float(kl(adapter))
    trained, losses = kangaroo.train_adapter(prop, cfg, params, adapter, batches(0, 60), learning_rate=3e-3)
    after = float(kl(trained))
    # KL(p || q) recomputed here from the two models' logits (independent of distill_loss).
    T = held_out.shape[1]
    pos = jnp.broadcast_to(jnp.arange(T), held_out.shape)
    lp = jax.nn.log_softmax(forward_jit(cfg, params, held_out, pos)[0], -1)
    lq = jax.nn.log_softmax(forward_jit(prop.cfg, prop.draft_params(params, trained), held_out, pos)[0], -1)
    ref = float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), -1)))
    assert abs(ref - after) < 1e-4 * max(1.0, ref)
    assert len(losses) == 60 and after < 0.6 * before


@pytest.mark.slow
def test_specdec_head_learns_acceptance(models):
    cfg, params, dcfg, dparams = models
    sp = SamplingParams.make(temperature=1.0)
    prop = P.SpecDecPPProposer(cfg=dcfg, k=4, threshold=0.5)
    pparams = {"model": dparams, "head": specdec_pp.init_head(dcfg.d_model, jax.random.PRNGKey(0))}
    held_out = jnp.asarray(batches(98, 1, (32, 24))[0])
    # Labels recomputed here: min(1, p(x_t) / q(x_t)) from the two models' softmaxes.
    T = held_out.shape[1]
    pos = jnp.broadcast_to(jnp.arange(T), held_out.shape)
    p = jax.nn.softmax(process_logits(forward_jit(cfg, params, held_out, pos)[0], sp), -1)[:, :-1]
    q = jax.nn.softmax(process_logits(forward_jit(dcfg, dparams, held_out, pos)[0], sp), -1)[:, :-1]
    x = held_out[:, 1:, None]
    y = np.asarray(jnp.minimum(1.0, jnp.take_along_axis(p, x, -1) / jnp.take_along_axis(q, x, -1))[..., 0])
    m = y.mean()
    best_constant = float(-(y * np.log(m) + (1 - y) * np.log(1 - m)).mean())
    loss = jax.jit(lambda pp: specdec_pp.head_loss(prop, cfg, params, pp, held_out, sp))
    before = float(loss(pparams))
    trained, losses = specdec_pp.train_head(prop, cfg, params, pparams, batches(1, 150, (32, 24)), sp, 3e-3)
    after = float(loss(trained))
    # The trained head beats every constant predictor: it reads the draft's hidden state.
    assert after < best_constant - 0.01 and after < before


def test_specdec_head_loss_on_draft_tokens_only(models):
    """draft_tokens_only: the BCE averaged over the positions whose next token is the draft's
    greedy choice (greedy labels [argmax p == x]), recomputed here in numpy from both models."""
    cfg, params, dcfg, dparams = models
    sp = SamplingParams.make(temperature=0.0)
    prop = P.SpecDecPPProposer(cfg=dcfg, k=4)
    head = specdec_pp.init_head(dcfg.d_model, jax.random.PRNGKey(0), scale=2.0)
    rs = np.random.RandomState(5)
    T = 12
    pos = jnp.broadcast_to(jnp.arange(T), (8, T))
    q_lg, q_h, _ = forward_jit(dcfg, dparams, jnp.zeros((8, T), jnp.int32), pos)
    # Sequences that follow the draft's greedy choice about half the time, so both weights occur.
    toks = np.zeros((8, T), np.int32)
    toks[:, 0] = rs.randint(0, V, 8)
    for t in range(1, T):
        q_lg, q_h, _ = forward_jit(dcfg, dparams, jnp.asarray(toks[:, :t]), pos[:, :t])
        greedy = np.asarray(jnp.argmax(q_lg[:, -1], -1))
        toks[:, t] = np.where(rs.rand(8) < 0.5, greedy, rs.randint(0, V, 8))
    x = jnp.asarray(toks)
    got = float(specdec_pp.head_loss(prop, cfg, params, {"model": dparams, "head": head}, x, sp,
                                     reject_weight=2.0, draft_tokens_only=True))
    p_lg = np.asarray(forward_jit(cfg, params, x, pos)[0], np.float64)
    q_lg, q_h, _ = (np.asarray(a, np.float64) for a in forward_jit(dcfg, dparams, x, pos))
    y = (p_lg[:, :-1].argmax(-1) == toks[:, 1:]).astype(np.float64)
    w = (q_lg[:, :-1].argmax(-1) == toks[:, 1:]).astype(np.float64)
    z = np.asarray(specdec_pp.acceptance_logit(head, jnp.asarray(q_h[:, 1:], jnp.float32)), np.float64)
    bce = -(y * -np.logaddexp(0, -z) + 2.0 * (1 - y) * -np.logaddexp(0, z))
    assert 0 < w.sum() < w.size
    np.testing.assert_allclose(got, (w * bce).sum() / w.sum(), rtol=1e-5)
