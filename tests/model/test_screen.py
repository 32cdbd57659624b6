"""The bfloat16 screen of the unembedding (tokax.model.screen) gives exactly
the float32 argmax: against float64 numpy on random and adversarial
unembeddings (near-ties under bfloat16 resolution, exact duplicates, more
near-ties than candidates, which needs the fallback), and inside the
speculative loops, whose greedy output stays equal to plain greedy while
sampled output is unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokax.testing import model_params
from tokax.decode import proposers as P
from tokax.decode.generate import Generator
from tokax.decode.proposers import DySpecProposer, SpecTrProposer
from tokax.decode.sampling import SamplingParams
from tokax.decode.speculative import SpeculativeGenerator
from tokax.decode.tree_speculative import TreeSpeculativeGenerator
from tokax.model import config as mc
from tokax.model.screen import ArgmaxScreen, greedy_tokens, make_argmax_screen, screen_for, screened_argmax

V, D = 4096, 64


def f64_argmax(h, e):
    return np.argmax(np.asarray(h, np.float64) @ np.asarray(e, np.float64).T, axis=-1)


def check(e, h, n_cand=16):
    e, h = np.asarray(e, np.float32), np.asarray(h, np.float32)
    got = np.asarray(jax.jit(screened_argmax, static_argnums=3)(make_argmax_screen(e), jnp.asarray(e), jnp.asarray(h),
                                                                 n_cand))
    np.testing.assert_array_equal(got, f64_argmax(h, e))
    return got


def test_random_unembedding():
    rs = np.random.RandomState(0)
    e = rs.randn(V, D) / np.sqrt(D)
    h = rs.randn(3, 40, D) * 8.0  # any leading shape
    got = check(e, h)
    assert got.shape == (3, 40)


def test_near_ties_below_bf16_resolution():
    """Rows that bfloat16 cannot tell apart (relative differences ~1e-5): the
    float32 rescoring decides, whichever of them is the true best."""
    rs = np.random.RandomState(1)
    e = rs.randn(V, D) / np.sqrt(D)
    h = rs.randn(32, D) * 8.0
    for i in range(len(h)):
        best = int(f64_argmax(h[i:i + 1], e)[0])
        for j, v in enumerate(rs.choice(V, 5, replace=False)):  # 5 near-copies of the best row
            e[v] = e[best] + 1e-5 * rs.randn(D) * np.linalg.norm(e[best]) / np.sqrt(D)
    check(e, h)


def test_exact_duplicates_take_the_smallest_id():
    rs = np.random.RandomState(2)
    e = rs.randn(V, D) / np.sqrt(D)
    e[[100, 3000, 17]] = e[2000]
    h = np.stack([e[2000] * 50, rs.randn(D)])
    got = check(e, h)
    assert got[0] == 17


def test_more_near_ties_than_candidates_falls_back():
    """40 rows equal under bfloat16, the true best the last of them: the top
    ``n_cand`` upper bounds (ties go to small ids) miss it, so only the
    float32 fallback can return it."""
    rs = np.random.RandomState(3)
    e = rs.randn(V, D) / np.sqrt(D)
    base = e[7].copy()
    group = np.arange(1000, 1040)
    for r, v in enumerate(group):
        e[v] = base * (1 + 1e-7 * r)  # increasing along the group, below bf16 resolution
    h = np.stack([base * 30, rs.randn(D) * 8.0])
    got = check(e, h, n_cand=4)
    assert got[0] == group[-1]


def test_tiny_vocabulary_and_single_position():
    rs = np.random.RandomState(4)
    e = rs.randn(8, D).astype(np.float32)
    check(e, rs.randn(5, D) * 3.0)  # V <= n_cand: every token is rescored
    cfg = mc.tiny(vocab_size=V)
    params = model_params(cfg, seed=1)
    h = jnp.asarray(rs.randn(1, 1, cfg.d_model), jnp.float32)
    top = greedy_tokens(cfg, params, h, screen_for(params, True))  # one position, through the screen
    np.testing.assert_array_equal(np.asarray(top), f64_argmax(h, params["embed"]))


def test_screen_for_arguments():
    cfg = mc.tiny(vocab_size=64)
    params = model_params(cfg, seed=1)
    assert screen_for(params, False) is None and screen_for(params, None) is None
    scr = screen_for(params, True)
    assert isinstance(scr, ArgmaxScreen) and screen_for(params, scr) is scr
    with pytest.raises(ValueError, match="greedy_screen='yes'"):
        screen_for(params, "yes")
    bf = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    with pytest.raises(ValueError, match="needs float32 params"):
        screen_for(bf, True)


# -- inside the speculative loops: a tiny model with a vocabulary large enough to screen ------------

@pytest.fixture(scope="module")
def target():
    cfg = mc.tiny(vocab_size=V)
    return cfg, model_params(cfg, seed=11)


def prompts():
    rs = np.random.RandomState(5)
    base = [rs.randint(0, 50, size=n).tolist() for n in (3, 9, 14, 6)]
    base[2] = base[1] + base[1][:5]  # a repeat, so prompt lookup drafts
    return base, [12, 16, 9, 14]


def test_chain_and_tree_loops_with_screen_equal_plain_greedy(target):
    cfg, params = target
    base, budgets = prompts()
    ref = Generator(cfg, params, eos_ids=()).generate(base, budgets)
    dcfg = mc.tiny(vocab_size=V, n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, ffn_dim=32)
    dparams = model_params(dcfg, seed=5)
    chain = [(P.PromptLookupProposer(k=4, max_ngram=2), None), (P.DraftModelProposer(dcfg, k=3), dparams)]
    for prop, pp in chain:
        outs, st = SpeculativeGenerator(cfg, params, prop, pp, eos_ids=(), greedy_screen=True).generate(base, budgets)
        assert outs == ref, type(prop).__name__
    assert sum(s["accepted"] for s in st) > 0
    for prop in (DySpecProposer(dcfg, n_nodes=6, rounds=3, max_children=3), SpecTrProposer(dcfg, k=2, length=3)):
        gen = TreeSpeculativeGenerator(cfg, params, prop, dparams, eos_ids=(), greedy_screen=True)
        assert gen.generate(base, budgets)[0] == ref, type(prop).__name__


def test_sampling_ignores_the_screen(target):
    """At temperature > 0 verification needs the full distribution: the same
    seed gives the same samples with and without a screen."""
    cfg, params = target
    base, budgets = prompts()
    sp = SamplingParams.make(temperature=1.0)
    prop = P.PromptLookupProposer(k=3)
    a = SpeculativeGenerator(cfg, params, prop, eos_ids=()).generate(base, budgets, sp, seed=3)[0]
    b = SpeculativeGenerator(cfg, params, prop, eos_ids=(), greedy_screen=True).generate(base, budgets, sp, seed=3)[0]
    assert a == b
