"""The retrieval datastore (tokax.decode.proposers.retrieval) against plain
Python counting: every stored context gives its most frequent next token
(smallest id on ties) and that token's share; contexts never span two
documents; drafts follow the longest stored context and stop where the
datastore runs out or is unsure. Losslessness of the method itself is tested
with every other proposer in test_speculative.py."""

import collections

import jax.numpy as jnp
import numpy as np
import pytest

from tokax.decode.proposers import Context, RetrievalProposer
from tokax.decode.proposers.retrieval import (RetrievalTreeProposer, _hash, build_table, longest_context, lookup,
                                            merge_into_tree, table_draft)
from tokax.decode.sampling import SamplingParams

V = 6


def reference_counts(docs, n):
    ref = collections.defaultdict(collections.Counter)
    for d in docs:
        for i in range(n, len(d)):
            ref[tuple(int(x) for x in d[i - n : i])][int(d[i])] += 1
    return ref


def best_of(counter):
    m = max(counter.values())
    return min(t for t, c in counter.items() if c == m), m / sum(counter.values()), m


def random_docs(seed, n_docs=60, vocab=V):
    rs = np.random.RandomState(seed)
    # Skewed token frequencies, so that shares differ and ties are rare but possible.
    p = np.arange(1, vocab + 1, dtype=np.float64)[::-1] ** 2
    return [rs.choice(vocab, size=rs.randint(1, 30), p=p / p.sum()) for _ in range(n_docs)]


@pytest.mark.parametrize("min_count", [1, 3])
def test_table_matches_counting(min_count):
    docs = random_docs(0)
    table = build_table(docs, max_n=3, min_count=min_count)
    stored = 0
    for n in (1, 2, 3):
        ref = reference_counts(docs, n)
        every = np.array(list(np.ndindex(*(V,) * n)), np.int32)  # all V**n contexts, stored or not
        found, nxt, conf = (np.asarray(x) for x in lookup(table, jnp.asarray(every)))
        for ctx, f, t, c in zip(map(tuple, every.tolist()), found, nxt, conf):
            if ctx in ref and best_of(ref[ctx])[2] >= min_count:
                want_t, want_c, _ = best_of(ref[ctx])
                assert f and t == want_t and c == pytest.approx(want_c, abs=1e-6), (n, ctx)
                stored += 1
            else:
                assert not f, (n, ctx)
    assert stored > 30  # the check covered real entries


def test_contexts_do_not_span_documents():
    table = build_table([np.array([1, 2]), np.array([3, 4])], max_n=2, min_count=1)
    found, _, _ = lookup(table, jnp.asarray([[2], [1]], jnp.int32))  # 2 ends a document; 1 -> 2
    assert np.asarray(found).tolist() == [False, True]
    found, nxt, _ = lookup(table, jnp.asarray([[1, 2], [2, 3]], jnp.int32))
    assert not np.asarray(found).any()


def test_hash_is_the_same_in_numpy_and_jax():
    cols = [np.random.RandomState(i).randint(0, 2**18, size=1000).astype(np.int32) for i in range(3)]
    a = _hash(cols, np)
    b = np.asarray(_hash([jnp.asarray(c) for c in cols], jnp))
    assert a.dtype == np.uint32 and (a == b).all()


def reference_draft(table_docs, max_n, min_count, seq, k, min_conf):
    refs = {n: reference_counts(table_docs, n) for n in range(1, max_n + 1)}
    ext, out = list(seq), []
    for _ in range(k):
        hit = None
        for n in range(max_n, 0, -1):
            if len(ext) >= n:
                cnt = refs[n].get(tuple(ext[-n:]))
                if cnt is not None and best_of(cnt)[2] >= min_count:
                    hit = best_of(cnt)
                    break
        if hit is None or hit[1] < min_conf:
            break
        out.append(hit[0])
        ext.append(hit[0])
    return out


@pytest.mark.parametrize("min_conf", [0.0, 0.45])
def test_draft_follows_longest_stored_context(min_conf):
    docs = random_docs(1, n_docs=25)
    table = build_table(docs, max_n=3, min_count=2)
    rs = np.random.RandomState(2)
    B, S, k = 64, 24, 5
    seq = rs.randint(0, V, size=(B, S)).astype(np.int32)
    L = rs.randint(1, S - k, size=B).astype(np.int32)
    live = rs.rand(B) < 0.9
    tokens, n = table_draft(table, jnp.asarray(seq), jnp.asarray(L), jnp.asarray(live), k, min_conf)
    tokens, n = np.asarray(tokens), np.asarray(n)
    lengths = []
    for b in range(B):
        want = reference_draft(docs, 3, 2, seq[b, : L[b]].tolist(), k, min_conf) if live[b] else []
        assert n[b] == len(want) and tokens[b, : n[b]].tolist() == want, b
        lengths.append(len(want))
    assert 0 in lengths and max(lengths) >= 2  # both stops and chains happened


def test_prompt_lookup_first_then_datastore():
    table = build_table([np.array([1, 2, 3, 4, 5] * 3)], max_n=2)
    prop = RetrievalProposer(k=3, max_ngram=2, min_conf=0.0)
    seq = np.zeros((2, 16), np.int32)
    seq[0, :5] = [5, 4, 1, 5, 4]  # "5 4" occurred before: prompt lookup drafts "1 5 4"
    seq[1, :3] = [0, 0, 2]  # no earlier 2: the datastore continues 2 -> 3 4 5
    ctx = Context(seq=jnp.asarray(seq), seq_len=jnp.asarray([5, 3]), live=jnp.asarray([True, True]))
    prop_out, _ = prop.propose(None, table, (), ctx, SamplingParams.make(), None)
    assert np.asarray(prop_out.n).tolist() == [3, 3]
    assert np.asarray(prop_out.tokens).tolist() == [[1, 5, 4], [3, 4, 5]]


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="min_conf"):
        RetrievalProposer(min_conf=1.5)
    with pytest.raises(ValueError, match="max_n"):
        build_table([np.arange(4)], max_n=0)


def test_runner_up_matches_counting():
    """``longest_context`` also returns the second most frequent continuation of the longest
    stored context (smallest id on ties, -1 if there is none) and its share."""
    docs = random_docs(3)
    table = build_table(docs, max_n=2, min_count=1)
    refs = {n: reference_counts(docs, n) for n in (1, 2)}
    rs = np.random.RandomState(4)
    B, S = 200, 12
    seq = rs.randint(0, V, size=(B, S)).astype(np.int32)
    L = rs.randint(1, S, size=B).astype(np.int32)
    found, nxt, conf, alt, alt_conf = (np.asarray(x) for x in longest_context(table, jnp.asarray(seq), jnp.asarray(L)))
    seen_alt = seen_none = 0
    for b in range(B):
        cnt = next((refs[n][c] for n in (2, 1) if L[b] >= n
                    for c in [tuple(seq[b, L[b] - n : L[b]].tolist())] if c in refs[n]), None)
        assert bool(found[b]) == (cnt is not None), b
        if cnt is None:
            continue
        ranked = sorted(cnt.items(), key=lambda tc: (-tc[1], tc[0]))
        total = sum(cnt.values())
        assert nxt[b] == ranked[0][0] and conf[b] == pytest.approx(ranked[0][1] / total, abs=1e-6)
        if len(ranked) > 1:
            assert alt[b] == ranked[1][0] and alt_conf[b] == pytest.approx(ranked[1][1] / total, abs=1e-6), b
            seen_alt += 1
        else:
            assert alt[b] == -1 and alt_conf[b] == 0, b
            seen_none += 1
    assert seen_alt > 20 and seen_none > 0


def tree_paths(tree, b):
    """Root paths (token tuples) of row b's valid nodes, checking the tree's invariants."""
    tok, par, ok = (np.asarray(x)[b] for x in (tree.tokens, tree.parents, tree.valid))
    paths = {}
    for i in range(len(tok)):
        assert par[i] < i  # topological
        if ok[i]:
            assert par[i] < 0 or ok[par[i]]  # a valid node's parent is valid
            paths[i] = (paths[par[i]] if par[i] >= 0 else ()) + (int(tok[i]),)
    assert len(set(paths.values())) == len(paths)  # no two nodes spell the same path
    return set(paths.values())


def reference_trie(cands, branches):
    """Python rule: the m-th non-empty candidate keeps its first (shared + branches[m]) tokens,
    ``shared`` = its longest common prefix with what the earlier ones keep."""
    kept, out = [], set()
    for c in [c for c in cands if c][: len(branches)]:
        shared = max((next((i for i, (x, y) in enumerate(zip(c, k)) if x != y), min(len(c), len(k)))
                      for k in kept), default=0)
        k = c[: shared + branches[len(kept)]]
        kept.append(k)
        out |= {tuple(k[:i]) for i in range(1, len(k) + 1)}
    return out


@pytest.mark.parametrize("branches", [(4, 2, 1), (3, 3), (2,)])
def test_merge_into_tree_is_the_trie_of_the_candidates(branches):
    rs = np.random.RandomState(sum(branches))
    B, C, K = 300, 3, max(branches)
    # Candidates over 3 tokens, so that they often share prefixes; some empty, some rows not live.
    cand = rs.randint(0, 3, size=(B, C, K)).astype(np.int32)
    cand[:, 1, :2] = np.where(rs.rand(B, 1) < 0.5, cand[:, 0, :2], cand[:, 1, :2])
    n = rs.randint(0, K + 1, size=(B, C)).astype(np.int32)
    live = rs.rand(B) < 0.9
    tree = merge_into_tree(jnp.asarray(cand), jnp.asarray(n), branches, jnp.asarray(live))
    assert tree.tokens.shape == (B, sum(branches))
    for b in range(B):
        cands = [cand[b, c, : n[b, c]].tolist() for c in range(C)] if live[b] else []
        assert tree_paths(tree, b) == reference_trie(cands, branches), b
    if len(branches) > 1:  # later candidates did hang below shared prefixes
        first = np.cumsum((0,) + branches[:-1])[1:]
        assert (np.asarray(tree.valid)[:, first] & (np.asarray(tree.parents)[:, first] >= 0)).sum() > 10


def test_retrieval_tree_candidates():
    """Prompt lookup's continuation, the datastore's chain and its runner-up, in one trie."""
    # After 2: 3 (twice), 4 (once); after 3: 1; after 4: 1; after 1: 2.
    table = build_table([np.array([1, 2, 3, 1, 2, 3, 1, 2, 4, 1])], max_n=1, min_count=1)
    prop = RetrievalTreeProposer(branches=(3, 2, 2), max_ngram=1, min_conf=0.0, alt_min_conf=0.2)
    seq = np.zeros((2, 16), np.int32)
    seq[0, :4] = [2, 0, 5, 2]  # prompt lookup: 2 -> "0 5 2"; datastore: "3 1 2"; runner-up "4 1"
    seq[1, :2] = [5, 2]  # no earlier 2: the datastore chain and the runner-up only
    ctx = Context(seq=jnp.asarray(seq), seq_len=jnp.asarray([4, 2]), live=jnp.asarray([True, True]))
    tree, _ = prop.propose(None, table, (), ctx, SamplingParams.make(), None)
    assert tree_paths(tree, 0) == {(0,), (0, 5), (0, 5, 2), (3,), (3, 1), (4,), (4, 1)}
    assert tree_paths(tree, 1) == {(3,), (3, 1), (3, 1, 2), (4,), (4, 1)}
    assert prop.max_depth == 3 and prop.n_nodes == 7
    with pytest.raises(ValueError, match="branches"):
        RetrievalTreeProposer(branches=(2, 3))
