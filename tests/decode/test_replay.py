"""The draft replay (``tokax.decode.replay``) counts the same rounds as the speculative loop.

Reference: the jitted greedy speculative loops themselves, run on a tiny random
target; their per-row pass counters are the numbers the replay must reproduce
from the loop's own greedy outputs, without the target."""

import jax
import numpy as np
import pytest

from tokax import testing as T
from tokax.decode import proposers as P
from tokax.decode.proposers.blockwise import init_heads
from tokax.decode.proposers.retrieval import RetrievalTreeProposer
from tokax.decode.replay import estimated_speedup, replay_greedy, tree_path_length
from tokax.decode.speculative import SpeculativeGenerator
from tokax.decode.tree_speculative import TreeSpeculativeGenerator

V = T.TINY_VOCAB
N = 24  # new tokens per prompt


@pytest.fixture(scope="module")
def target():
    return T.tiny_target()


def table():
    return T.tiny_datastore()


PROPOSERS = {
    "prompt_lookup": lambda: (P.PromptLookupProposer(k=3, max_ngram=2), None),
    "anpd": lambda: (P.ANPDProposer(k=3, max_ngram=3, init_ngram=2), None),  # state updated per round
    "retrieval": lambda: (P.RetrievalProposer(k=3, max_ngram=2, min_conf=0.2), table()),
    "retrieval_tree": lambda: (RetrievalTreeProposer(branches=(3, 2, 1), max_ngram=2, min_conf=0.2,
                                                     alt_min_conf=0.05), table()),
}


@pytest.mark.parametrize("method", sorted(PROPOSERS))
def test_replay_counts_the_loops_passes(target, method):
    """Ragged prompts in one batch, rows accepting different amounts: per row, the replay's
    pass count equals the loop's, and the replay's totals add up."""
    cfg, params = target
    prop, pp = PROPOSERS[method]()
    Gen = TreeSpeculativeGenerator if method == "retrieval_tree" else SpeculativeGenerator
    gen = Gen(cfg, params, prop, pp, eos_ids=())
    rs = np.random.RandomState(3)
    prompts = [list(rs.randint(0, V, size=n)) for n in (5, 9, 14, 7, 11, 6)]
    prompts[0] = [3, 5, 2, 7, 3, 5, 2]  # a repeat: lookups find drafts from the start
    outs, stats = gen.generate(prompts, N)
    assert all(len(o) == N for o in outs)
    loop_passes = [s["target_passes"] for s in stats]
    assert len(set(loop_passes)) > 1, "rows should accept different amounts"
    assert min(loop_passes) < N, "some drafts should be accepted"
    r = replay_greedy(prop, pp, prompts, outs)
    assert r["row_passes"] == loop_passes
    assert r["passes"] == sum(loop_passes) == sum(r["pass_lengths"].values())
    assert r["tokens_per_pass"] == pytest.approx(N * len(prompts) / sum(loop_passes))
    # A cap of one draft per round: never more accepted than one draft per pass.
    capped = replay_greedy(prop, pp, prompts, outs, cap=1)
    assert capped["tokens_per_pass"] <= 2.0
    assert set(capped["pass_lengths"]) <= {1, 2}


def test_tree_path_length_follows_matching_children():
    # root -> 0 (a) -> 2 (c) ; root -> 1 (b) -> 3 (d) -> 4 (e); node 5 (f) invalid under 4
    tokens = np.array([1, 2, 3, 4, 5, 6])
    parents = np.array([-1, -1, 0, 1, 3, 4])
    valid = np.array([True, True, True, True, True, False])
    assert tree_path_length(tokens, parents, valid, [2, 4, 5, 6]) == 3  # b d e, then f is invalid
    assert tree_path_length(tokens, parents, valid, [1, 3, 9]) == 2
    assert tree_path_length(tokens, parents, valid, [3]) == 0  # c is not a child of the root
    assert tree_path_length(tokens, parents, valid, [2, 4]) == 2  # the output ends


def test_estimated_speedup_by_hand():
    # 10 rounds: 4 of length 1, 6 of length 4; 30 tokens. Plain greedy: 30 steps of cost 2.
    r = {"tokens_per_pass": 3.0, "passes": 10, "pass_lengths": {1: 4, 4: 6}}
    assert estimated_speedup(r, {1: 2.0, 4: 3.0}) == pytest.approx(30 * 2.0 / (4 * 2.0 + 6 * 3.0))
    with pytest.raises(ValueError, match="no pass cost for lengths \\[4\\]"):
        estimated_speedup(r, {1: 2.0})


def test_drafts_from_the_target_cannot_be_replayed(target):
    cfg, _ = target
    prop = P.BlockwiseProposer(k=2)
    with pytest.raises(ValueError, match="hidden states"):
        replay_greedy(prop, init_heads(cfg.d_model, 2, jax.random.PRNGKey(0)), [[1, 2]], [[3, 4]])
    with pytest.raises(ValueError, match="one length"):
        replay_greedy(P.PromptLookupProposer(k=2), None, [[1, 2], [3]], [[3, 4], [5]])
