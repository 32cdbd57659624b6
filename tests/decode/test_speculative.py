"""Speculative decoding is lossless for every proposer: greedy output equals
plain greedy decoding token for token (ragged batches, rows accepting
different amounts), and sampled output follows the target's exact
distribution, computed by enumerating token sequences with the model."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.decode.test_verify import chi2_pvalue, resample_from_p_verify
from tokax.decode import proposers as P
from tokax.decode.generate import Generator
from tokax.decode.proposers import kangaroo, specdec_pp
from tokax.decode.proposers.draft_model import draft_unembed, subset_head_params
from tokax.decode.proposers.ngram import latest_match
from tokax.decode.proposers.retrieval import build_table
from tokax.decode.sampling import SamplingParams, process_logits
from tokax.decode.speculative import SpeculativeGenerator
from tokax.model import config as mc
from tokax.model.decoder import forward_jit, init_params

V = 8  # small vocabulary: the sampled distribution is enumerable
B = 2048  # rows per call; greedy and sampling calls share one compiled program per method
K = 3
# *_subset: the draft's head covers only SUBSET (q = 0 on the other tokens, as the distilled
# Gemma draft's frequent-token head); the target's mass there must come from the residual.
METHODS = ["draft", "draft_subset", "prompt_lookup", "retrieval", "retrieval_table", "anpd", "kangaroo", "kangaroo_subset", "specdec_pp",
           "specdec_pp_subset"]
SUBSET = [0, 2, 3, 5, 6]
SAMPLING = SamplingParams.make(temperature=0.9, top_k=6, top_p=0.95)
SAMPLE_PROMPT = [3, 5, 2, 7, 3, 5, 2, 6, 3, 5]  # repeats, so n-gram lookups find drafts
N_SAMPLED = 3  # tokens whose joint distribution is tested (V**3 = 512 cells)


def numpy_init(shapes, seed: int, embed_std: float = 0.15):
    """Random params for a tree of ShapeDtypeStructs, drawn in numpy (no
    compile): matrices ~ N(0, 1/fan_in), norm weights ~ N(0, 0.3^2) so that
    (1 + w) is exercised, and a small embedding so that next-token
    distributions are far from one-hot (sampling tests need spread)."""
    rs = np.random.RandomState(seed)

    def one(path, a):
        name = jax.tree_util.keystr(path[-1:])
        if a.ndim == 1:
            x = 0.3 * rs.randn(*a.shape)
        elif "embed" in name:
            x = embed_std * rs.randn(*a.shape)
        else:
            fan_in = a.shape[0] * a.shape[1] if "'o'" in name else a.shape[0]
            x = rs.randn(*a.shape) / np.sqrt(fan_in)
        return jnp.asarray(x, a.dtype)

    return jax.tree_util.tree_map_with_path(one, shapes)


def model_params(cfg, seed):
    return numpy_init(jax.eval_shape(lambda k: init_params(cfg, k), jax.random.PRNGKey(0)), seed)


@pytest.fixture(scope="module")
def target():
    cfg = mc.tiny(vocab_size=V)
    return cfg, model_params(cfg, seed=21)


@pytest.fixture(scope="module")
def generators(target):
    cfg, params = target
    dcfg = mc.tiny(vocab_size=V, n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, ffn_dim=32)
    dparams = model_params(dcfg, seed=5)
    head = specdec_pp.init_head(dcfg.d_model, jax.random.PRNGKey(4), scale=4.0)
    rs = np.random.RandomState(11)
    table = build_table([rs.randint(0, V, size=60) for _ in range(40)], max_n=2, min_count=1)
    made = {
        "draft": (P.DraftModelProposer(dcfg, k=K), dparams),
        "prompt_lookup": (P.PromptLookupProposer(k=K, max_ngram=2), None),
        "anpd": (P.ANPDProposer(k=K, max_ngram=3, init_ngram=2), None),
        # A datastore of random "documents" over the small vocabulary: every short context is
        # stored, so rows whose context has no match still draft (and the table alone drafts always).
        "retrieval": (P.RetrievalProposer(k=K, max_ngram=2, min_conf=0.2), table),
        "retrieval_table": (P.RetrievalProposer(k=K, min_conf=0.2, prompt_lookup=False), table),
        "kangaroo": (
            P.KangarooProposer.make(cfg, n_shallow=1, k=K, threshold=0.4),
            numpy_init(jax.eval_shape(lambda k: kangaroo.init_adapter(cfg, 1, k), jax.random.PRNGKey(0)), seed=3),
        ),
        # The adapter with its own final norm and a head over SUBSET only (as the shipped Gemma
        # adapter): q = 0 elsewhere.
        "kangaroo_subset": (
            P.KangarooProposer.make(cfg, n_shallow=1, k=K, threshold=0.4),
            kangaroo.with_subset_head(params, numpy_init(jax.eval_shape(lambda k: kangaroo.init_adapter(cfg, 1, k),
                                                                       jax.random.PRNGKey(0)), seed=3), SUBSET,
                                      final_norm=params["final_norm"] + 0.5),
        ),
        "specdec_pp": (P.SpecDecPPProposer(cfg=dcfg, k=K, threshold=0.6), {"model": dparams, "head": head}),
        "draft_subset": (P.DraftModelProposer(dcfg, k=K), subset_head_params(dparams, SUBSET)),
        "specdec_pp_subset": (P.SpecDecPPProposer(cfg=dcfg, k=K, threshold=0.6),
                              {"model": subset_head_params(dparams, SUBSET), "head": head}),
    }
    return {m: SpeculativeGenerator(cfg, params, prop, pp, eos_ids=()) for m, (prop, pp) in made.items()}


def ragged_prompts():
    """8 prompts of different lengths, some with repeats; tiled to B rows."""
    rs = np.random.RandomState(7)
    base = [rs.randint(0, V, size=n).tolist() for n in (1, 2, 5, 9, 16, 12, 3, 7)]
    base[4] = base[3][:8] + base[3][:8]  # a repeated block
    budgets = [16, 9, 13, 16, 5, 16, 11, 14]
    return base, budgets


@pytest.fixture(scope="module")
def plain_greedy(target):
    cfg, params = target
    base, budgets = ragged_prompts()
    return Generator(cfg, params, eos_ids=()).generate(base, budgets)


@pytest.mark.parametrize("method", METHODS)
def test_greedy_equals_plain_greedy(generators, plain_greedy, method):
    base, budgets = ragged_prompts()
    reps = B // len(base)
    outs, st = generators[method].generate(base * reps, budgets * reps)
    for i, row in enumerate(outs):
        assert row == plain_greedy[i % len(base)], (method, i)
    proposed = np.array([s["proposed"] for s in st[: len(base)]])
    accepted = np.array([s["accepted"] for s in st[: len(base)]])
    passes = np.array([s["target_passes"] for s in st[: len(base)]])
    hist = np.array([s["accepted_hist"] for s in st[: len(base)]])
    assert (accepted <= proposed).all() and (hist.sum(1) == passes).all()
    # Each pass emits n_acc + 1 tokens, the last one possibly cut at the budget.
    assert ((accepted + passes >= budgets) & (accepted + passes - budgets <= K)).all()
    assert accepted.sum() > 0 and len(set(accepted.tolist())) > 1  # rows really advance by different amounts
    if method in ("kangaroo", "kangaroo_subset", "specdec_pp"):
        assert proposed.sum() < K * passes.sum()  # the early stop rule fired


def exact_target_distribution(cfg, params, prompt, n, sp):
    """P(x_1..x_n | prompt) under the processed target distribution, by
    enumerating all V**(n-1) prefixes in one cache-free forward."""
    L = len(prompt)
    seqs = np.array([prompt + list(t) for t in itertools.product(range(V), repeat=n - 1)], np.int32)
    logits, _, _ = forward_jit(cfg, params, jnp.asarray(seqs), jnp.broadcast_to(jnp.arange(seqs.shape[1]), seqs.shape))
    logp = np.asarray(jax.nn.log_softmax(process_logits(logits[:, L - 1 :], sp), -1), np.float64)  # [V**(n-1), n, V]
    probs = np.zeros((V,) * n)
    for row, t in enumerate(itertools.product(range(V), repeat=n - 1)):
        for x in range(V):
            lp = sum(logp[row, i, t[i]] for i in range(n - 1)) + logp[row, n - 1, x]
            probs[t + (x,)] = np.exp(lp)
    return probs.reshape(-1)


@pytest.fixture(scope="module")
def exact(target):
    cfg, params = target
    p = exact_target_distribution(cfg, params, SAMPLE_PROMPT, N_SAMPLED, SAMPLING)
    assert abs(p.sum() - 1) < 1e-5
    return p


def sampled_codes(gen, seeds):
    codes, st_all = [], []
    for seed in seeds:
        outs, st = gen.generate([SAMPLE_PROMPT] * B, N_SAMPLED, SAMPLING, seed=seed)
        arr = np.array(outs)
        assert arr.shape == (B, N_SAMPLED)
        codes.append(np.ravel_multi_index(arr.T, (V,) * N_SAMPLED))
        st_all += st
    return np.concatenate(codes), st_all


@pytest.mark.parametrize("method", METHODS)
def test_sampling_matches_target_distribution(generators, exact, method):
    codes, st = sampled_codes(generators[method], seeds=range(4))
    proposed = sum(s["proposed"] for s in st)
    accepted = sum(s["accepted"] for s in st)
    assert 0 < accepted < proposed  # both the accept and the residual path are exercised
    assert chi2_pvalue(codes, exact) > 0.01


def test_wrong_acceptance_rule_fails(target, generators, exact):
    """Negative control: resampling from p instead of norm(max(0, p - q))
    after a rejection is detected by the same test."""
    cfg, params = target
    good = generators["draft"]
    wrong = SpeculativeGenerator(cfg, params, good.proposer, good.pparams, eos_ids=(), verifier=resample_from_p_verify)
    codes, _ = sampled_codes(wrong, seeds=range(4))
    assert chi2_pvalue(codes, exact) < 1e-4


def test_stop_token_ends_rows_like_plain(target, plain_greedy):
    """Greedy decoding with a stop token is greedy decoding without one, cut
    after the token's first occurrence (rows stop at different rounds)."""
    cfg, params = target
    base, budgets = ragged_prompts()
    # A stop token that cuts at least one row mid-way (not at its first token, not at its budget).
    eos = next(t for t in range(V) if any(t in r[1:-1] and t != r[0] for r in plain_greedy))
    ref = [row[: row.index(eos) + 1] if eos in row else row for row in plain_greedy]
    assert any(1 < len(r) < b for r, b in zip(ref, budgets))
    gen = SpeculativeGenerator(cfg, params, P.PromptLookupProposer(k=K), None, eos_ids=(eos,))
    outs, _ = gen.generate(base, budgets)
    assert outs == ref


def test_draft_vocab_mismatch_is_an_error(target):
    cfg, params = target
    dcfg = mc.tiny(vocab_size=V + 1, n_layers=1)
    with pytest.raises(ValueError, match=r"draft model vocab_size=9 differs from the target's vocab_size=8"):
        SpeculativeGenerator(cfg, params, P.DraftModelProposer(dcfg, k=2), None)


def test_latest_match_brute_force():
    rs = np.random.RandomState(3)
    Bm, S, n = 32, 24, 2
    seq = rs.randint(0, 3, size=(Bm, S)).astype(np.int32)
    L = rs.randint(1, S + 1, size=Bm).astype(np.int32)
    suf = np.stack([seq[b, max(L[b] - n, 0) : max(L[b] - n, 0) + n] for b in range(Bm)])
    got = np.asarray(latest_match(jnp.asarray(seq), jnp.asarray(L), jnp.asarray(suf), jnp.asarray(L)))
    for b in range(Bm):
        want = max([j for j in range(S - n) if j + n < L[b] and (seq[b, j : j + n] == suf[b]).all()], default=-1)
        assert got[b] == want


def test_verify_block_sizes():
    from tokax.decode.speculative import verify_block_sizes

    assert verify_block_sizes(5, None) == (1, 2, 4, 6)
    assert verify_block_sizes(5, None, can_be_empty=False) == (2, 4, 6)
    assert verify_block_sizes(7, None) == (1, 2, 4, 8)
    assert verify_block_sizes(3, (4,)) == (4,)
    with pytest.raises(ValueError, match="include k\\+1"):
        verify_block_sizes(3, (1, 2))


def test_subset_head_is_the_full_head_conditioned_on_the_subset(target):
    """q from a subset head = softmax of the full head's logits renormalized over the subset, 0 elsewhere."""
    dcfg = mc.tiny(vocab_size=V, n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, ffn_dim=32)
    dparams = model_params(dcfg, seed=5)
    h = jnp.asarray(np.random.RandomState(0).randn(3, 16), jnp.float32)
    q = np.asarray(jax.nn.softmax(draft_unembed(dcfg, subset_head_params(dparams, SUBSET), h), -1))
    full = np.asarray(h, np.float64) @ np.asarray(dparams["embed"], np.float64).T
    want = np.zeros_like(full)
    e = np.exp(full[:, SUBSET] - full[:, SUBSET].max(-1, keepdims=True))
    want[:, SUBSET] = e / e.sum(-1, keepdims=True)
    np.testing.assert_allclose(q, want, atol=1e-6)


@pytest.mark.parametrize("sizes", [(1, 2, 3, 4), (4,)])
@pytest.mark.parametrize("method", ["retrieval", "anpd", "draft"])
def test_greedy_with_other_pass_lengths(target, generators, plain_greedy, method, sizes):
    """Every pass length from 1 to K + 1 (``verify_sizes='every'``) and one full pass give the
    same tokens as plain greedy, ragged batch included."""
    cfg, params = target
    g = generators[method]
    gen = SpeculativeGenerator(cfg, params, g.proposer, g.pparams, eos_ids=(), verify_sizes=sizes)
    assert gen.verify_sizes == sizes
    base, budgets = ragged_prompts()
    outs, _ = gen.generate(base * 2, budgets * 2)
    assert outs == plain_greedy * 2


def test_job_pass_sizes():
    import ml_collections

    from tokax.decode.speculative import verify_block_sizes
    from tokax.jobs.speculative import pass_sizes

    c = ml_collections.ConfigDict({"verify_sizes": "every"})
    assert pass_sizes(c, 5) == (1, 2, 3, 4, 5, 6)
    c.verify_sizes = "full"
    assert pass_sizes(c, 5) == (6,)
    c.verify_sizes = "pow2"
    assert pass_sizes(c, 5) is None and verify_block_sizes(5, None) == (1, 2, 4, 6)


def test_verify_loop_updates_the_cache_in_place(target):
    """The compiled chain loop holds no copy of a KV-cache buffer inside its while loop: verify
    passes (in a ``lax.switch`` over pass lengths, inside the greedy / sampled ``lax.cond``) read
    the cache and the block is written outside the branches. (Before session 7 XLA copied the
    whole cache two or three times per round.)"""
    import re

    from tokax.decode.speculative import speculative_generate
    from tokax.model.screen import screen_for

    cfg, params = target
    prompt, lens, budget = jnp.zeros((1, 16), jnp.int32), jnp.asarray([5]), jnp.asarray([16])
    hlo = speculative_generate.lower(
        cfg, params, P.PromptLookupProposer(k=K), None, prompt, lens, budget, SamplingParams.make(),
        jax.random.PRNGKey(0), buffer_len=16, eos_ids=(), verify_sizes=(1, 2, K + 1),
        screen=screen_for(params, True)).compile().as_text()
    slots = 16 + 16 + K + 1
    shape = f"f32[1,{slots},{cfg.n_kv_heads},{cfg.head_dim}]"
    comp, copies = None, []
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            comp = line.split("(")[0].strip()
        if re.search(r"= " + re.escape(shape) + r"\{[0-9,]*\} copy\(", line):
            copies.append(comp)
    assert copies, "the cache shape was not found: the test no longer looks at the right buffers"
    assert all(c.startswith("ENTRY") for c in copies), copies
