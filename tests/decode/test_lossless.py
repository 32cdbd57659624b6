"""Every registered decoding method is lossless, on the loop that runs it: built by the method
registry (``tokax.decode.methods``) from a config block on a random tiny target, greedy output
equals plain greedy decoding token for token (a ragged batch, rows accepting different amounts),
and sampled output follows the target's exact distribution (chi-square over the first three
tokens, the distribution enumerated with the model), while deliberately wrong verification rules
fail the same test. Variants exercise a draft head over a token subset (q = 0 elsewhere, the
mass there must come from the residual) and the retrieval datastore alone."""

import numpy as np
import pytest

from tokax import testing as T
from tokax.decode import methods
from tokax.decode.generate import Generator
from tokax.decode.speculative import SpeculativeGenerator
from tokax.decode.tree import TreeVerifier
from tokax.decode.tree_speculative import TreeSpeculativeGenerator
from tokax.decode.verify import verify

B = 2048  # rows per call; greedy and sampling calls share one compiled program per method
CASE_NAMES = ["draft", "draft_subset", "prompt_lookup", "retrieval", "retrieval_table", "anpd", "kangaroo",
              "kangaroo_subset", "specdec_pp", "specdec_pp_subset", "lookahead", "blockwise",
              "tree", "dyspec", "token_recycling", "spectr", "medusa", "retrieval_tree"]
# Token Recycling's nodes are deterministic and its greedy path is what the tree verifier shares
# with the others; its sampled output is checked by the tree verifier's own tests.
SAMPLED = [n for n in CASE_NAMES if n != "token_recycling"]
EARLY_STOP = ("kangaroo", "kangaroo_subset", "specdec_pp")  # methods that end a round early by rule


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return T.lossless_cases(str(tmp_path_factory.mktemp("lossless")))


@pytest.fixture(scope="module")
def generators(cases):
    made = {}

    def get(name):
        if name not in made:
            made[name] = T.tiny_generator(name, cases)
        return made[name]

    return get


@pytest.fixture(scope="module")
def plain_greedy():
    cfg, params = T.tiny_target()
    base, budgets = T.ragged_prompts()
    return Generator(cfg, params, eos_ids=()).generate(base, budgets)


@pytest.fixture(scope="module")
def exact():
    cfg, params = T.tiny_target()
    p = T.exact_target_distribution(cfg, params, T.SAMPLE_PROMPT, T.N_SAMPLED, T.sampling_params())
    assert abs(p.sum() - 1) < 1e-5
    return p


def is_tree(gen) -> bool:
    return gen.proposer.kind == "tree"


def test_every_registered_method_is_covered(cases):
    assert sorted({m for m, _, _ in cases.values()}) == sorted(methods.METHODS)
    assert sorted(cases) == sorted(CASE_NAMES)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_greedy_equals_plain_greedy(generators, plain_greedy, name):
    gen = generators(name)
    base, budgets = T.ragged_prompts()
    reps = B // len(base)
    outs, st = gen.generate(base * reps, budgets * reps)
    for i, row in enumerate(outs):
        assert row == plain_greedy[i % len(base)], (name, i)
    st = st[: len(base)]
    proposed, accepted, passes = (np.array([s[k] for s in st]) for k in ("proposed", "accepted", "target_passes"))
    hist = np.array([s["accepted_hist"] for s in st])
    most = gen.proposer.max_depth if is_tree(gen) else gen.proposer.k
    assert (accepted <= proposed).all() and (hist.sum(1) == passes).all()
    # Each pass emits n_acc + 1 tokens, the last one possibly cut at the budget.
    assert ((accepted + passes >= budgets) & (accepted + passes - np.array(budgets) <= most)).all()
    assert accepted.sum() > 0 and len(set(accepted.tolist())) > 1  # rows really advance by different amounts
    if is_tree(gen):
        assert hist[:, 2:].sum() > 0  # paths deeper than one node were accepted
    if name in EARLY_STOP:
        assert proposed.sum() < most * passes.sum()  # the early stop rule fired
    if name == "lookahead":
        assert (proposed == most * passes).all()  # every round drafts a full window
    if name == "blockwise":
        # Round 1 has no hidden state (one-token pass, no drafts); every later round drafts K.
        assert (proposed == most * (passes - 1)).all()


@pytest.mark.parametrize("name", SAMPLED)
def test_sampling_matches_target_distribution(generators, exact, name):
    gen = generators(name)
    codes, st = T.sampled_codes(gen, range(3 if is_tree(gen) else 4), T.sampling_params())
    proposed = sum(s["proposed"] for s in st)
    accepted = sum(s["accepted"] for s in st)
    passes = sum(s["target_passes"] for s in st)
    if is_tree(gen):
        assert 0 < accepted < passes * gen.proposer.max_depth  # accept and reject paths both taken
    else:
        assert 0 < accepted < proposed  # both the accept and the residual path are exercised
    assert T.chi2_pvalue(codes, exact) > 0.01


def test_wrong_acceptance_rule_fails(generators, exact):
    """Negative control: resampling from p instead of norm(max(0, p - q)) after a rejection is
    detected by the same test."""
    good = generators("draft")
    wrong = SpeculativeGenerator(good.cfg, good.params, good.proposer, good.pparams, eos_ids=(),
                                 verifier=T.resample_from_p_verify)
    codes, _ = T.sampled_codes(wrong, range(4), T.sampling_params())
    assert T.chi2_pvalue(codes, exact) < 1e-4


def shifted_q_verify(p_logits, drafts, n_draft, q_logits, sp, rng):
    """WRONG: draft i checked against head i-1's distribution (an off-by-one head index).
    (Dropping q altogether would *not* be wrong: a draft drawn independently of the verifier
    may be verified as a fixed token.)"""
    import jax.numpy as jnp

    return verify(p_logits, drafts, n_draft, jnp.roll(q_logits, 1, axis=1), sp, rng)


@pytest.mark.slow  # one more compile of the loop
def test_misaligned_draft_probs_fail(generators, exact):
    """Negative control: the same chi-square test detects q taken from the wrong head."""
    gen = generators("blockwise")
    wrong = SpeculativeGenerator(gen.cfg, gen.params, gen.proposer, gen.pparams, eos_ids=(), verifier=shifted_q_verify)
    codes, _ = T.sampled_codes(wrong, range(4), T.sampling_params())
    assert T.chi2_pvalue(codes, exact) < 1e-4


@pytest.mark.slow  # a second compile; tests/decode/test_tree_verify.py has the fast negative controls
def test_wrong_tree_rule_fails(generators, exact):
    """Negative control: not updating the residual between siblings."""
    good = generators("tree")
    wrong = TreeSpeculativeGenerator(good.cfg, good.params, good.proposer, good.pparams, eos_ids=(),
                                     verifier=TreeVerifier(update_residual=False))
    codes, _ = T.sampled_codes(wrong, range(3), T.sampling_params())
    assert T.chi2_pvalue(codes, exact) < 1e-3
