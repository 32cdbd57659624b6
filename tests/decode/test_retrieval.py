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
from tokax.decode.proposers.retrieval import _hash, build_table, lookup, table_draft
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
