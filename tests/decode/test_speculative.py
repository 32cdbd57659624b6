"""The chain loop (``tokax.decode.speculative``) around its proposers: stop tokens, other verify
pass lengths, vocabulary checks, n-gram matching, subset heads, and no cache copy in the compiled
loop. Losslessness of every method (greedy and sampled) is ``tests/decode/test_lossless.py``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokax import testing as T
from tokax.decode import proposers as P
from tokax.decode.generate import Generator
from tokax.decode.proposers.draft_model import draft_unembed, subset_head_params
from tokax.decode.proposers.ngram import latest_match
from tokax.decode.sampling import SamplingParams
from tokax.decode.speculative import SpeculativeGenerator
from tokax.model import config as mc

V = T.TINY_VOCAB
K = 3
SUBSET = T.SUBSET


@pytest.fixture(scope="module")
def target():
    return T.tiny_target()


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return T.lossless_cases(str(tmp_path_factory.mktemp("chain")))


@pytest.fixture(scope="module")
def plain_greedy(target):
    cfg, params = target
    base, budgets = T.ragged_prompts()
    return Generator(cfg, params, eos_ids=()).generate(base, budgets)


def test_stop_token_ends_rows_like_plain(target, plain_greedy):
    """Greedy decoding with a stop token is greedy decoding without one, cut
    after the token's first occurrence (rows stop at different rounds)."""
    cfg, params = target
    base, budgets = T.ragged_prompts()
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
    dparams = T.model_params(dcfg, seed=5)
    h = jnp.asarray(np.random.RandomState(0).randn(3, 16), jnp.float32)
    q = np.asarray(jax.nn.softmax(draft_unembed(dcfg, subset_head_params(dparams, SUBSET), h), -1))
    full = np.asarray(h, np.float64) @ np.asarray(dparams["embed"], np.float64).T
    want = np.zeros_like(full)
    e = np.exp(full[:, SUBSET] - full[:, SUBSET].max(-1, keepdims=True))
    want[:, SUBSET] = e / e.sum(-1, keepdims=True)
    np.testing.assert_allclose(q, want, atol=1e-6)


@pytest.mark.parametrize("sizes", [(1, 2, 3, 4), (4,)])
@pytest.mark.parametrize("method", ["retrieval", "anpd", "draft"])
def test_greedy_with_other_pass_lengths(target, cases, plain_greedy, method, sizes):
    """Every pass length from 1 to K + 1 (``verify_sizes='every'``) and one full pass give the
    same tokens as plain greedy, ragged batch included."""
    cfg, params = target
    g = T.tiny_generator(method, cases)
    gen = SpeculativeGenerator(cfg, params, g.proposer, g.pparams, eos_ids=(), verify_sizes=sizes)
    assert gen.verify_sizes == sizes
    base, budgets = T.ragged_prompts()
    outs, _ = gen.generate(base * 2, budgets * 2)
    assert outs == plain_greedy * 2


def test_job_pass_sizes():
    import ml_collections

    from tokax.decode.methods import pass_sizes
    from tokax.decode.speculative import verify_block_sizes

    c = ml_collections.ConfigDict({"verify_sizes": "every"})
    assert pass_sizes(c.verify_sizes, 5) == (1, 2, 3, 4, 5, 6)
    c.verify_sizes = "full"
    assert pass_sizes(c.verify_sizes, 5) == (6,)
    c.verify_sizes = "pow2"
    assert pass_sizes(c.verify_sizes, 5) is None and verify_block_sizes(5, None) == (1, 2, 4, 6)


def test_verify_loop_updates_the_cache_in_place(target):
    """The compiled chain loop holds no copy of a KV-cache buffer inside its while loop: verify
    passes (in a ``lax.switch`` over pass lengths, inside the greedy / sampled ``lax.cond``) read
    the cache and the block is written outside the branches. (Before commit f0074e0 XLA copied the
    whole cache two or three times per round.)"""
    import re

    from tokax.decode.loop import decode
    from tokax.decode.speculative import ChainRound
    from tokax.model.screen import screen_for

    cfg, params = target
    prompt, lens, budget = jnp.zeros((1, 16), jnp.int32), jnp.asarray([5]), jnp.asarray([16])
    hlo = decode.lower(
        cfg, params, ChainRound(P.PromptLookupProposer(k=K), verify_sizes=(1, 2, K + 1)), None, prompt, lens, budget,
        SamplingParams.make(), jax.random.PRNGKey(0), screen_for(params, True), buffer_len=16,
        eos_ids=()).compile().as_text()
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
