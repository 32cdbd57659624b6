"""Training hooks (slow: gradient compiles): the Kangaroo adapter (distillation from the frozen target)
and the SpecDec++ acceptance head (BCE against acceptance probabilities)
learn on tiny data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokax.testing import model_params
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


def test_specdec_candidate_hidden_is_the_hidden_after_reading_the_candidate(models):
    """candidate_hidden's one masked pass against a forward over each prefix plus its
    candidate alone (no cache), for ragged rows and candidates that differ from the text."""
    _, _, dcfg, dparams = models
    rs = np.random.RandomState(3)
    B, L, J = 3, 14, 5
    lengths = np.array([14, 9, 11], np.int32)
    seqs = np.where(np.arange(L)[None] < lengths[:, None], rs.randint(0, V, (B, L)), 0).astype(np.int32)
    at = np.stack([rs.choice(n, J, replace=False) for n in lengths]).astype(np.int32)
    cands = rs.randint(0, V, (B, J)).astype(np.int32)
    got = np.asarray(specdec_pp.candidate_hidden(dcfg, dparams, jnp.asarray(seqs), jnp.asarray(lengths),
                                                 jnp.asarray(at), jnp.asarray(cands)))
    for b in range(B):
        for j in range(J):
            x = np.concatenate([seqs[b, : at[b, j] + 1], cands[b, j: j + 1]])[None]
            _, h, _ = forward_jit(dcfg, dparams, jnp.asarray(x), jnp.arange(x.shape[1])[None])
            np.testing.assert_allclose(got[b, j], np.asarray(h[0, -1]), rtol=2e-5, atol=2e-5)


def test_specdec_fit_head_beats_a_constant_on_separable_features():
    """fit_head on features whose label is a threshold of one coordinate: the held-out BCE
    (head_bce, recomputed here in numpy) falls well under the best constant's."""
    rs = np.random.RandomState(0)
    x = rs.randn(4000, 8).astype(np.float32)
    y = (x[:, 2] + 0.3 * rs.randn(4000) > 0.4).astype(np.float32)
    head = specdec_pp.init_head(8, jax.random.PRNGKey(0), hidden_dim=16, prior=0.5)
    head, losses = specdec_pp.fit_head(head, x[:3000], y[:3000], steps=300, batch=256, learning_rate=1e-2)
    res = specdec_pp.head_bce(head, x[3000:], y[3000:])
    a = np.asarray(specdec_pp.acceptance_prob(head, jnp.asarray(x[3000:])), np.float64)
    yt = y[3000:].astype(np.float64)
    ref = -(yt * np.log(a) + (1 - yt) * np.log(1 - a)).mean()
    m = yt.mean()
    assert abs(res["bce_head"] - ref) < 1e-3
    assert abs(res["bce_best_constant"] - -(m * np.log(m) + (1 - m) * np.log(1 - m))) < 1e-3
    assert res["bce_head"] < 0.6 * res["bce_best_constant"] and len(losses) == 300


def _greedy_batch(cfg, params, rs, B=8, L=20, J=6):
    """Right-padded rows whose last J real tokens are the target's greedy continuation, and
    (tokens, lengths, at, targets) for greedy_ce_loss; targets recomputed here by greedy decoding."""
    toks = np.zeros((B, L), np.int32)
    lengths = rs.randint(J + 3, L + 1, B).astype(np.int32)
    at = np.zeros((B, J), np.int32)
    for b, n in enumerate(lengths):
        toks[b, : n - J] = rs.randint(0, V, n - J)
        for t in range(n - J, n):
            lg, _, _ = forward_jit(cfg, params, jnp.asarray(toks[b: b + 1, :t]), jnp.arange(t)[None])
            toks[b, t] = int(jnp.argmax(lg[0, -1]))
        at[b] = np.arange(n - J - 1, n - 1)
    targets = np.take_along_axis(toks, at + 1, axis=1)
    return toks, lengths, at, targets


def test_kangaroo_greedy_ce_loss_against_numpy(models):
    """greedy_ce_loss with a subset head: the mean NLL of the target's greedy tokens under the
    draft's subset softmax, over the targets inside the subset, recomputed from the draft's
    own forward over each row (no padding)."""
    cfg, params, _, _ = models
    rs = np.random.RandomState(4)
    prop = P.KangarooProposer.make(cfg, n_shallow=1, k=4)
    adapter = kangaroo.init_adapter(cfg, 1, jax.random.PRNGKey(2), identity=False)
    subset = [0, 2, 3, 5, 6, 9, 11]
    pp = kangaroo.with_subset_head(params, adapter, subset)
    toks, lengths, at, targets = _greedy_batch(cfg, params, rs)
    got = float(kangaroo.greedy_ce_loss(prop, params, pp, *(jnp.asarray(a) for a in (toks, lengths, at, targets))))
    full = prop.draft_params(params, adapter)
    nll = []
    for b, n in enumerate(lengths):
        _, h, _ = forward_jit(prop.cfg, full, jnp.asarray(toks[b: b + 1, :n]), jnp.arange(n)[None])
        for j, t in zip(at[b], targets[b]):
            if t in subset:
                z = np.asarray(h[0, j], np.float64) @ np.asarray(params["embed"], np.float64)[subset].T
                nll.append(np.logaddexp.reduce(z) - z[subset.index(t)])
    assert 0 < len(nll) < targets.size
    np.testing.assert_allclose(got, np.mean(nll), rtol=1e-4)


def _copy_batch(rs, B=16, L=20, J=6):
    """Random right-padded rows whose label at each of J positions is the token one before it:
    a rule that only attention can learn (early exit sees nothing of it)."""
    toks = rs.randint(0, V, (B, L)).astype(np.int32)
    lengths = rs.randint(J + 3, L + 1, B).astype(np.int32)
    at = np.stack([rs.choice(np.arange(1, n), J, replace=False) for n in lengths]).astype(np.int32)
    return toks, lengths, at, np.take_along_axis(toks, at - 1, axis=1)


@pytest.mark.slow
def test_kangaroo_greedy_training_raises_agreement_and_keeps_the_ffn_off(models):
    """train_adapter_greedy learns a rule from its targets: held-out top-1 agreement of the
    draft (measured here by a forward over each row alone) rises from chance, and the
    attention-only adapter's FFN stays exactly zero."""
    cfg, params, _, _ = models
    rs = np.random.RandomState(0)
    prop = P.KangarooProposer.make(cfg, n_shallow=1, k=4)
    adapter = kangaroo.attention_only(kangaroo.init_adapter(cfg, 1, jax.random.PRNGKey(0), identity=True))
    adapter = kangaroo.with_subset_head(params, adapter, final_norm=params["final_norm"])  # its own norm, trained
    held = _copy_batch(rs)

    def agreement(a):
        dp = prop.draft_params(params, a)
        hits = 0
        for b, n in enumerate(held[1]):
            lg, _, _ = forward_jit(prop.cfg, dp, jnp.asarray(held[0][b: b + 1, :n]), jnp.arange(n)[None])
            hits += int((np.asarray(jnp.argmax(lg[0], -1))[held[2][b]] == held[3][b]).sum())
        return hits / held[3].size

    before = agreement(adapter)
    trained, losses = kangaroo.train_adapter_greedy(prop, params, adapter, [_copy_batch(rs) for _ in range(300)],
                                                    learning_rate=1e-2)
    assert all(float(jnp.abs(trained["adapter"][k]).max()) == 0.0 for k in kangaroo.FFN_KEYS)
    assert float(jnp.abs(trained["final_norm"] - params["final_norm"]).max()) > 0
    after = agreement(trained)
    assert before < 0.3 and after > before + 0.3 and np.mean(losses[-20:]) < 0.7 * np.mean(losses[:20])


def test_kangaroo_load_adapter_checks_and_restores(models, tmp_path):
    cfg, params, _, _ = models
    adapter = kangaroo.init_adapter(cfg, 1, jax.random.PRNGKey(2), identity=False)
    path = str(tmp_path / "a.npz")
    norm = np.linspace(-1, 1, cfg.d_model).astype(np.float32)
    P.save_params(path, {"adapter": jax.tree.map(lambda a: np.asarray(a, np.float16), adapter),
                         "head_ids": np.array([0, 3, 5], np.int32), "n_shallow": np.int32(1), "final_norm": norm})
    got = kangaroo.load_adapter(path, cfg, params, 1)
    np.testing.assert_array_equal(got["final_norm"], norm)
    assert P.KangarooProposer.make(cfg, 1).draft_params(params, got)["decoder"]["final_norm"] is got["final_norm"]
    assert got["adapter"]["q"].dtype == cfg.jnp_dtype
    np.testing.assert_allclose(got["adapter"]["q"], np.asarray(adapter["q"], np.float16).astype(np.float32))
    np.testing.assert_array_equal(got["head_w"], np.asarray(params["embed"])[[0, 3, 5]])
    with pytest.raises(ValueError, match="first 1 layers"):
        kangaroo.load_adapter(path, cfg.replace(n_layers=3), params, 2)
    P.save_params(path, {"q": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match="not a Kangaroo adapter"):
        kangaroo.load_adapter(path, cfg, params, 1)
