"""Verifiers against independent references: a numpy loop for greedy, and
the target distribution (chi-square over many vectorized rows) for
speculative sampling, with wrong acceptance rules as negative controls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokax.decode.sampling import SamplingParams, process_logits
from tokax.decode.verify import greedy_verify, sampling_verify
from tokax.testing import always_accept_verify, chi2_pvalue, resample_from_p_verify


def test_greedy_verify_matches_loop():
    rs = np.random.RandomState(0)
    B, K, V = 64, 4, 7
    p_logits = rs.randn(B, K + 1, V).astype(np.float32)
    top = p_logits.argmax(-1)
    # Drafts that agree with the argmax for a random prefix, then disagree.
    drafts = top[:, :K].copy()
    cut = rs.randint(0, K + 1, size=B)
    for b in range(B):
        if cut[b] < K:
            drafts[b, cut[b]] = (top[b, cut[b]] + 1 + rs.randint(V - 1)) % V
    n_draft = rs.randint(0, K + 1, size=B)
    n_acc, nxt = jax.jit(greedy_verify)(jnp.asarray(p_logits), jnp.asarray(drafts), jnp.asarray(n_draft))
    for b in range(B):
        i = 0
        while i < n_draft[b] and top[b, i] == drafts[b, i]:
            i += 1
        assert int(n_acc[b]) == i and int(nxt[b]) == top[b, i]
    assert 0 < int(n_acc.sum()) < int(n_draft.sum())  # both outcomes occur


N_ROWS = 60_000


@pytest.fixture(scope="module")
def setup():
    """One target p (two positions) and draft q, V = 8; drafts drawn from q in numpy."""
    rs = np.random.RandomState(1)
    V, K = 8, 2
    p_logits = (1.5 * rs.randn(1, K + 1, V)).astype(np.float32)
    q_logits = (1.5 * rs.randn(1, K, V)).astype(np.float32)
    sp = SamplingParams.make(temperature=0.8, top_k=6, top_p=0.95)
    p = np.asarray(jax.nn.softmax(process_logits(jnp.asarray(p_logits), sp), -1))[0].astype(np.float64)
    q = np.asarray(jax.nn.softmax(process_logits(jnp.asarray(q_logits), sp), -1))[0].astype(np.float64)
    drafts = np.stack([rs.choice(V, size=N_ROWS, p=q[i] / q[i].sum()) for i in range(K)], 1).astype(np.int32)
    return dict(V=V, K=K, p_logits=p_logits, q_logits=q_logits, sp=sp, p=p, q=q, drafts=drafts)


def emitted(verifier, s, q_logits, drafts, n_draft, seed=0):
    """First and second emitted tokens (-1 where only one token came out)."""
    B = drafts.shape[0]
    f = jax.jit(verifier)
    pl = jnp.broadcast_to(jnp.asarray(s["p_logits"]), (B,) + s["p_logits"].shape[1:])
    ql = None if q_logits is None else jnp.broadcast_to(jnp.asarray(q_logits), (B,) + q_logits.shape[1:])
    n_acc, nxt = f(pl, jnp.asarray(drafts), jnp.asarray(n_draft), ql, s["sp"], jax.random.PRNGKey(seed))
    n_acc, nxt = np.asarray(n_acc), np.asarray(nxt)
    out = np.where(n_acc[:, None] > np.arange(drafts.shape[1])[None], drafts, -1)
    out = np.where(np.arange(drafts.shape[1])[None] == n_acc[:, None], nxt[:, None], out)
    return out[:, 0], out[:, 1], n_acc


@pytest.mark.parametrize("n_draft", [1, 2])
def test_speculative_sampling_is_exact(setup, n_draft):
    s = setup
    nd = np.full((N_ROWS,), n_draft, np.int32)
    first, second, n_acc = emitted(sampling_verify, s, s["q_logits"], s["drafts"], nd)
    assert 0 < (n_acc > 0).mean() < 1
    assert chi2_pvalue(first, s["p"][0]) > 0.01
    # Given the first draft passed, the second token follows p_1 (q_1 and p_1 do not depend on it here).
    assert chi2_pvalue(second[n_acc >= 1], s["p"][1]) > 0.01


def test_deterministic_drafts_are_exact(setup):
    """q = one-hot (n-gram drafts): accept with prob p(x), else p without x."""
    s = setup
    drafts = np.tile(np.array([[int(np.argmax(s["q"][0])), 3]], np.int32), (N_ROWS, 1))
    first, second, n_acc = emitted(sampling_verify, s, None, drafts, np.full((N_ROWS,), 2, np.int32), seed=1)
    assert 0 < (n_acc > 0).mean() < 1
    assert chi2_pvalue(first, s["p"][0]) > 0.01
    assert chi2_pvalue(second[n_acc >= 1], s["p"][1]) > 0.01


@pytest.mark.parametrize("wrong", [always_accept_verify, resample_from_p_verify])
def test_wrong_rules_fail_the_same_check(setup, wrong):
    s = setup
    first, _, _ = emitted(wrong, s, s["q_logits"], s["drafts"], np.full((N_ROWS,), 2, np.int32), seed=2)
    assert chi2_pvalue(first, s["p"][0]) < 1e-4


def test_verifiers_declare_their_greedy_path():
    """The loops take greedy tokens from the screen only for verifiers that declare it."""
    from tokax.decode.tree import SpecTrVerifier, TreeVerifier
    from tokax.decode.verify import ALWAYS, AT_ZERO_TEMPERATURE, greedy_path, verify

    assert greedy_path(greedy_verify) == ALWAYS
    assert greedy_path(verify) == AT_ZERO_TEMPERATURE
    assert greedy_path(TreeVerifier()) == greedy_path(TreeVerifier(update_residual=False)) == AT_ZERO_TEMPERATURE
    assert greedy_path(SpecTrVerifier(k=2, length=3)) == AT_ZERO_TEMPERATURE
    assert greedy_path(sampling_verify) is None  # reads the logits at every temperature

    def odd(*a):
        return None

    odd.greedy_path = "sometimes"
    with pytest.raises(ValueError, match="sometimes"):
        greedy_path(odd)


def test_an_undeclared_verifier_gets_logits_under_the_screen():
    """A custom verifier without ``greedy_path`` (here: never accept, emit the argmax) receives the
    float32 logits even with the screen on, and its output is still plain greedy's."""
    from tokax.testing import model_params
    from tokax.decode.generate import Generator
    from tokax.decode.proposers import PromptLookupProposer
    from tokax.decode.speculative import SpeculativeGenerator
    from tokax.model import config as mc

    seen = []

    def reject_all(p_logits, drafts, n_draft, q_logits, sp, rng):
        seen.append(p_logits.shape)
        return jnp.zeros_like(n_draft), jnp.argmax(p_logits[:, 0], axis=-1).astype(jnp.int32)

    cfg = mc.tiny(vocab_size=32)
    params = model_params(cfg, seed=4)
    prompts = [[3, 5, 2, 7, 3, 5, 2], [1, 9, 4]]
    gen = SpeculativeGenerator(cfg, params, PromptLookupProposer(k=2), None, eos_ids=(), verifier=reject_all,
                               greedy_screen=True)
    outs, stats = gen.generate(prompts, 10)
    plain = Generator(cfg, params, eos_ids=()).generate(prompts, 10)
    assert [list(o) for o in outs] == [list(p) for p in plain]
    assert seen and all(s[-1] == 32 for s in seen)  # traced with [B, T, V] logits
    assert all(s["accepted"] == 0 and s["target_passes"] == 10 for s in stats)
