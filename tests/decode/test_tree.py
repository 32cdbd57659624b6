"""Token trees on random tiny models: the tree pass equals scoring every
root-to-node path alone with a plain causal forward; compaction to a path
leaves the cache a plain prefill would; templates, stop tokens, vocabulary
checks, Medusa's one-path tree against the blockwise chain, valid-first
ordering and short passes. Every tree method's losslessness (greedy and
sampled) is ``tests/decode/test_lossless.py``."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokax import testing as T
from tokax.decode.generate import Generator
from tokax.decode import proposers as TP
from tokax.decode.proposers.blockwise import init_heads
from tokax.decode.tree import (Tree, TreeVerifier, block_mask, block_positions, compact_to_path, tree_depth,
                               valid_first)
from tokax.decode.tree_speculative import TreeSpeculativeGenerator
from tokax.model import config as mc
from tokax.model import kv_cache as kvc
from tokax.model.decoder import forward, forward_jit

V = T.TINY_VOCAB


@pytest.fixture(scope="module")
def target():
    return T.tiny_target()


@pytest.fixture(scope="module")
def plain_greedy(target):
    cfg, params = target
    base, budgets = T.ragged_prompts()
    return Generator(cfg, params, eos_ids=()).generate(base, budgets)


# ----------------------------------------------------------------------------
# The tree pass and compaction against plain causal forwards.


def random_trees(rs, rows, N, vocab):
    """Random topological trees (parent of node i uniform over [-1, i)), some
    nodes invalid (with their descendants)."""
    parents = np.array([[rs.randint(-1, i) for i in range(N)] for _ in range(rows)], np.int32)
    tokens = rs.randint(0, vocab, size=(rows, N)).astype(np.int32)
    valid = rs.rand(rows, N) < 0.85
    for b in range(rows):
        for i in range(N):
            if parents[b, i] >= 0 and not valid[b, parents[b, i]]:
                valid[b, i] = False
    return parents, tokens, valid


def path_to(parents, i):
    out = []
    while i >= 0:
        out.append(i)
        i = parents[i]
    return out[::-1]


def reference_last_logits(cfg, params, seqs):
    """Logits after the last token of each sequence, from one cache-free causal forward."""
    L = max(len(x) for x in seqs)
    arr = np.array([x + [0] * (L - len(x)) for x in seqs], np.int32)
    logits, _, _ = forward_jit(cfg, params, jnp.asarray(arr), jnp.broadcast_to(jnp.arange(L), arr.shape))
    return [np.asarray(logits[i, len(x) - 1]) for i, x in enumerate(seqs)]


def test_tree_pass_equals_per_path_forward():
    """Each valid node's logits in the one-pass tree equal the last logits of
    a cache-free causal forward over prompt + its root path (prompts longer
    than the sliding window, ragged lengths, one row not live)."""
    cfg = mc.tiny(vocab_size=32)
    params = T.model_params(cfg, seed=2)
    rs = np.random.RandomState(0)
    rows, P, N = 3, 14, 12
    lens = np.array([14, 9, 11], np.int32)
    prompt = rs.randint(0, 32, size=(rows, P)).astype(np.int32)
    parents, tokens, valid = random_trees(rs, rows, N, 32)
    live = np.array([True, True, False])
    cache = kvc.init_cache(cfg, rows, 40)
    ar = np.arange(P)[None]
    _, _, cache = forward_jit(cfg, params, jnp.asarray(prompt), jnp.asarray(np.where(ar < lens[:, None] - 1, ar, -1)),
                              cache, return_logits=False)
    tree = Tree(tokens=jnp.asarray(tokens), parents=jnp.asarray(parents), valid=jnp.asarray(valid))
    last = prompt[np.arange(rows), lens - 1][:, None]
    block = jnp.concatenate([jnp.asarray(last), tree.tokens], 1)
    pos = block_positions(tree, jnp.asarray(lens - 1), jnp.asarray(live))
    mask = block_mask(tree.parents)
    logits, _, cache2 = jax.jit(lambda c: forward(cfg, params, block, pos, c, block_mask=mask))(cache)
    depth = np.asarray(tree_depth(tree.parents))
    # Reference: every root path scored alone, all in one cache-free causal
    # forward (right padding cannot change earlier positions).
    seqs, where = [], []
    for b in range(2):  # live rows
        ctx = prompt[b, : lens[b]].tolist()
        seqs.append(ctx)
        where.append((b, 0))
        for i in range(N):
            if valid[b, i]:
                pth = path_to(parents[b], i)
                assert len(pth) == depth[b, i]
                seqs.append(ctx + [int(tokens[b, j]) for j in pth])
                where.append((b, 1 + i))
    ref = reference_last_logits(cfg, params, seqs)
    for (b, t), r in zip(where, ref):
        np.testing.assert_allclose(np.asarray(logits[b, t]), r, atol=2e-4, rtol=2e-4)
    checked = len(seqs) - 2
    assert checked >= 12 and depth[:2][valid[:2]].max() >= 3

    # Compaction to the deepest valid path of each live row, then one more
    # token: equals the causal forward of prompt + path + token.
    paths = []
    for b in range(rows):
        ok = [i for i in range(N) if valid[b, i]]
        deepest = max(ok, key=lambda i: depth[b, i]) if ok else -1
        paths.append(path_to(parents[b], deepest) if deepest >= 0 else [])
    D = max(len(p) for p in paths)
    path = np.full((rows, D), -1, np.int32)
    for b, p in enumerate(paths):
        path[b, : len(p)] = p
    n_acc = np.array([len(p) for p in paths], np.int32)
    n_acc[~live] = 0
    compacted = compact_to_path(cache2, cache.length, jnp.asarray(path), jnp.asarray(n_acc), jnp.asarray(live))
    assert (np.asarray(compacted.length) == np.asarray(cache.length) + np.where(live, 1 + n_acc, 0)).all()
    nxt = rs.randint(0, 32, size=(rows, 1)).astype(np.int32)
    npos = np.where(live, lens + n_acc, -1)[:, None]
    lg, _, _ = jax.jit(lambda c: forward(cfg, params, jnp.asarray(nxt), jnp.asarray(npos), c))(compacted)
    seqs = [prompt[b, : lens[b]].tolist() + [int(tokens[b, j]) for j in paths[b]] + [int(nxt[b, 0])] for b in range(2)]
    ref = reference_last_logits(cfg, params, seqs)
    for b in range(2):
        np.testing.assert_allclose(np.asarray(lg[b, 0]), ref[b], atol=2e-4, rtol=2e-4)


def test_block_mask_brute_force():
    rs = np.random.RandomState(1)
    parents, _, _ = random_trees(rs, 4, 9, 5)
    m = np.asarray(block_mask(jnp.asarray(parents)))
    for b in range(4):
        assert m[b, 0].tolist() == [True] + [False] * 9
        for i in range(9):
            anc = set(path_to(parents[b], i))
            assert m[b, 1 + i].tolist() == [True] + [j in anc for j in range(9)]


def test_templates():
    par = TP.template_from_branching((3, 2, 1))
    assert len(par) == 3 + 6 + 6
    assert TP.template_depths(par) == (1,) * 3 + (2,) * 6 + (3,) * 6
    assert TP.template_ranks(par)[:9] == (0, 1, 2, 0, 1, 0, 1, 0, 1)
    with pytest.raises(ValueError, match="parents"):
        TP.DraftTreeProposer(mc.tiny(vocab_size=V), parents=(-1, 2, 0))


# ----------------------------------------------------------------------------
# The loop end to end.

def test_stop_token_ends_rows_like_plain(target, plain_greedy):
    cfg, params = target
    base, budgets = T.ragged_prompts()
    eos = next(t for t in range(V) if any(t in r[1:-1] and t != r[0] for r in plain_greedy))
    ref = [row[: row.index(eos) + 1] if eos in row else row for row in plain_greedy]
    assert any(1 < len(r) < b for r, b in zip(ref, budgets))
    prop = TP.TokenRecyclingProposer(V, k=2, parents=TP.template_from_branching((2, 2)))
    outs, _ = TreeSpeculativeGenerator(cfg, params, prop, None, eos_ids=(eos,)).generate(base, budgets)
    assert outs == ref


def test_vocab_mismatch_is_an_error(target):
    cfg, params = target
    with pytest.raises(ValueError, match=r"vocab_size=9 differs from the target's vocab_size=8"):
        TreeSpeculativeGenerator(cfg, params, TP.SpecTrProposer(mc.tiny(vocab_size=V + 1, n_layers=1)), None)
    with pytest.raises(ValueError, match=r"vocab_size=9 differs"):
        TreeSpeculativeGenerator(cfg, params, TP.TokenRecyclingProposer(V + 1), None)


def test_medusa_chain_tree_matches_blockwise_chain(target):
    """Medusa with a one-path tree (top-1 of each head) drafts exactly what the chain blockwise
    proposer drafts from the same heads, so both accept the same counts: this checks that the
    tree loop hands the heads the hidden state of the newest accepted token."""
    from tokax.decode.proposers.blockwise import BlockwiseProposer
    from tokax.decode.speculative import SpeculativeGenerator

    cfg, params = target
    heads = init_heads(cfg.d_model, 3, jax.random.PRNGKey(5), scale=0.7)
    base, budgets = T.ragged_prompts()
    tree_gen = TreeSpeculativeGenerator(cfg, params, TP.MedusaTreeProposer(topk=(1, 1, 1)), heads, eos_ids=())
    chain_gen = SpeculativeGenerator(cfg, params, BlockwiseProposer(k=3, sample_drafts=False), heads, eos_ids=())
    t_out, t_st = tree_gen.generate(base, budgets)
    c_out, c_st = chain_gen.generate(base, budgets)
    assert t_out == c_out
    assert [s["accepted"] for s in t_st] == [s["accepted"] for s in c_st]
    assert sum(s["accepted"] for s in t_st) > 0


def test_valid_first_keeps_paths_and_sibling_order():
    """``valid_first`` moves valid nodes to the front: every valid node keeps its root path, the
    parents still precede their children, and siblings keep their relative order."""
    rs = np.random.RandomState(5)
    rows, N = 50, 10
    parents, tokens, valid = random_trees(rs, rows, N, 5)
    q = rs.rand(rows, N, 5).astype(np.float32)
    t = Tree(tokens=jnp.asarray(tokens), parents=jnp.asarray(parents), valid=jnp.asarray(valid), q_probs=jnp.asarray(q))
    u = valid_first(t)
    up, ut, uv, uq = (np.asarray(x) for x in (u.parents, u.tokens, u.valid, u.q_probs))
    for b in range(rows):
        n = valid[b].sum()
        assert uv[b, :n].all() and not uv[b, n:].any()
        old = [i for i in range(N) if valid[b, i]]
        for new_i, old_i in enumerate(old):
            assert up[b, new_i] < new_i and ut[b, new_i] == tokens[b, old_i] and (uq[b, new_i] == q[b, old_i]).all()
            want = [tokens[b, j] for j in path_to(parents[b], old_i)]
            assert [ut[b, j] for j in path_to(up[b], new_i)] == want
        kids = lambda par, idx, p: [i for i in idx if par[i] == p]  # noqa: E731
        for p_old in [-1] + old:
            p_new = -1 if p_old < 0 else old.index(p_old)
            assert [old[i] for i in kids(up[b], range(n), p_new)] == kids(parents[b], old, p_old)


@dataclasses.dataclass(frozen=True)
class _LastNodeOracle(TP.TreeProposer):
    """Test proposer: three children of the root, the last one the target's greedy token (from a
    cache-free forward), the first two wrong. Greedy verification accepts the last valid node
    every round, so the next token comes from that node's score in the pass."""

    cfg: mc.ModelConfig
    n_nodes, max_depth, verify_sizes = 3, 1, (1, 2, 3, 4)

    def check(self, cfg):
        pass

    def verifier(self):
        return TreeVerifier()

    def init(self, tparams, pparams, prompt, prompt_len, cache_len):
        return ()

    def propose(self, tparams, pparams, st, ctx, sp, rng):
        B, S = ctx.seq.shape
        logits, _, _ = forward(self.cfg, tparams, ctx.seq, jnp.broadcast_to(jnp.arange(S), (B, S)))
        best = jnp.argmax(jnp.take_along_axis(logits, (ctx.seq_len - 1)[:, None, None], axis=1)[:, 0], -1)
        toks = jnp.stack([(best + 1) % V, (best + 2) % V, best], axis=1).astype(jnp.int32)
        return Tree(tokens=toks, parents=jnp.full((B, 3), -1, jnp.int32), valid=jnp.ones((B, 3), bool) & ctx.live[:, None]), st


def test_short_passes_score_the_last_valid_node(target, plain_greedy):
    """With variable pass lengths the pass always reaches the last valid node: a proposer whose
    accepted node is always the last one still reproduces plain greedy, accepting every round."""
    cfg, params = target
    base, budgets = T.ragged_prompts()
    gen = TreeSpeculativeGenerator(cfg, params, _LastNodeOracle(cfg), None, eos_ids=())
    assert gen.verify_sizes == (1, 2, 3, 4)
    out, stats = gen.generate(base, budgets)
    assert out == plain_greedy
    assert all(s["accepted"] >= s["target_passes"] - 1 for s in stats)  # only a budget cuts a round short
