"""Retrieval drafts: prompt lookup, else an n-gram datastore built from a corpus.

Prompt lookup (``ngram.PromptLookupProposer``) drafts only when the last
tokens already occurred in the context. On new text (code the model writes
from scratch) about a third of the rounds find no match and verify nothing.
This proposer fills those rounds from a static datastore, in the spirit of
REST (He et al. 2023, retrieval-based speculative decoding): for every
context of ``1..max_n`` tokens seen in a corpus, the datastore holds the
token that most often followed it and that token's share of the context's
continuations (its confidence), and the runner-up with its share. A draft is
built token by token from the longest stored context ending at (history +
drafts so far); drafting stops at a context the datastore lacks or whose
confidence is under ``min_conf``. REST retrieves by exact suffix match over
a suffix array and verifies a trie of continuations; here the datastore is a
fixed-size hash table per context length, so it runs inside the jitted loop
with static shapes. ``RetrievalProposer`` drafts one chain (prompt lookup,
else the datastore); ``RetrievalTreeProposer`` merges prompt lookup's
continuation, the datastore's chain and the datastore's runner-up into one
token tree with a static node budget per candidate (``merge_into_tree``),
verified in one target pass by ``tokax.decode.tree_speculative``.

Drafts are deterministic (the verifier treats q as one-hot), so the method is
lossless like every other proposer. The table is ``pparams``: arrays traced
by the loop, so a different corpus needs no recompile.

Build: ``build_table(docs)`` from token arrays (numpy, a few seconds for the
three million tokens of the standard library's training split);
``stdlib_table(tokenizer)`` is the table the ``retrieval`` method uses.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from tokax.data.greedy import greedy_corpus_docs
from tokax.data.stdlib import stdlib_docs, token_docs
from tokax.decode.proposers.base import ChainProposer, Context, Proposal, TreeProposer
from tokax.decode.proposers.ngram import PromptLookupProposer, _check_sizes, _suffix, write_token
from tokax.decode.tree import Tree, valid_first

PROBES = 8  # hash slots tried per lookup (linear probing)


def _hash(cols: Sequence, xp) -> object:
    """uint32 hash of a context given as ``n`` columns of token ids (numpy or jax.numpy:
    both wrap uint32 arithmetic the same way, so a table built in numpy is read in jit)."""
    h = xp.full(cols[0].shape, 0x811C9DC5, xp.uint32)
    for c in cols:
        h = (h ^ c.astype(xp.uint32)) * xp.uint32(0x01000193)
    h = h ^ (h >> xp.uint32(15))
    h = h * xp.uint32(0x2C1B3C6D)
    return h ^ (h >> xp.uint32(12))


@struct.dataclass
class NGramTable:
    """One open-addressed hash table per context length n = 1..len(keys)."""

    keys: tuple  # per n: [M_n, n] int32 context tokens (-1 in an empty slot); M_n a power of two
    next: tuple  # per n: [M_n] int32 the most frequent next token
    conf: tuple  # per n: [M_n] float32 its share of the context's continuations
    alt: tuple  # per n: [M_n] int32 the second most frequent next token (-1: none)
    alt_conf: tuple  # per n: [M_n] float32 its share

    @property
    def max_n(self) -> int:
        return len(self.keys)


def count_ngrams(docs: Iterable[np.ndarray], n: int, min_count: int = 1):
    """For every context of ``n`` tokens inside one document: the most frequent next token
    (ties: the smallest id), its count, the context's total count, and the runner-up.
    Returns ``(ctx [E, n] int32, next [E], count [E], total [E], alt [E] (-1: none),
    alt_count [E])`` for the contexts whose top count is at least ``min_count``, sorted."""
    rows = []
    for d in docs:
        d = np.asarray(d, np.int32)
        if len(d) > n:
            rows.append(np.lib.stride_tricks.sliding_window_view(d, n + 1))
    if not rows:
        z = np.zeros((0,), np.int64)
        return np.zeros((0, n), np.int32), z.astype(np.int32), z, z, z.astype(np.int32), z
    win = np.concatenate(rows)  # [N, n + 1]: context then next
    order = np.lexsort(win.T[::-1])  # by context, then next
    win = win[order]
    new_pair = np.concatenate([[True], (win[1:] != win[:-1]).any(1)])
    starts = np.flatnonzero(new_pair)
    pair_count = np.diff(np.append(starts, len(win)))
    pairs = win[starts]
    ctx = pairs[:, :n]
    new_ctx = np.concatenate([[True], (ctx[1:] != ctx[:-1]).any(1)])
    group = np.cumsum(new_ctx) - 1
    total = np.bincount(group, weights=pair_count).astype(np.int64)
    # Rank the pairs of each context by count; pairs are sorted by next id within a context,
    # so a stable sort by (group, -count) puts the smallest id first among ties.
    o = np.lexsort((-pair_count, group))
    first = np.concatenate([[True], group[o][1:] != group[o][:-1]])
    best = o[first]
    second = np.full(len(best), -1, np.int64)  # the runner-up pair of each group, if any
    has2 = np.concatenate([~first[1:], [False]])  # o[i + 1] is the same group's second pair
    second[group[o[np.flatnonzero(first & has2)]]] = o[np.flatnonzero(first & has2) + 1]
    keep = pair_count[best] >= min_count
    best, second = best[keep], second[keep]
    alt = np.where(second >= 0, pairs[np.maximum(second, 0), n], -1).astype(np.int32)
    alt_count = np.where(second >= 0, pair_count[np.maximum(second, 0)], 0)
    return (ctx[best].astype(np.int32), pairs[best, n].astype(np.int32), pair_count[best], total[group[best]],
            alt, alt_count)


def _place(ctx: np.ndarray, priority: np.ndarray, slots: int) -> np.ndarray:
    """Slot of each context in a table of ``slots`` entries (-1: no free slot within
    ``PROBES``); higher ``priority`` claims a contested slot first."""
    cols = [ctx[:, j] for j in range(ctx.shape[1])]
    h = _hash(cols, np).astype(np.int64)
    order = np.argsort(-priority, kind="stable")
    where = np.full(len(ctx), -1, np.int64)
    taken = np.zeros(slots, bool)
    todo = order
    for p in range(PROBES):
        s = (h[todo] + p) & (slots - 1)
        free = ~taken[s]
        cand, s = todo[free], s[free]
        _, first = np.unique(s, return_index=True)  # the first (highest priority) claimant wins
        win = cand[first]
        where[win] = s[first]
        taken[s[first]] = True
        todo = todo[where[todo] < 0]
        if len(todo) == 0:
            break
    return where


def build_table(docs: Sequence[np.ndarray], max_n: int = 3, min_count: int = 2, load: float = 0.5) -> NGramTable:
    """The datastore of ``docs`` (token arrays; no context spans two documents): per
    context length 1..``max_n``, every context seen with a next token at least
    ``min_count`` times, in a hash table about ``1/load`` times its size."""
    if max_n < 1 or min_count < 1 or not 0 < load <= 1:
        raise ValueError(f"build_table: need max_n >= 1, min_count >= 1, 0 < load <= 1 (got {max_n}, {min_count}, {load})")
    docs = [np.asarray(d, np.int32) for d in docs]
    keys, nxt, conf, alts, alt_conf = [], [], [], [], []
    for n in range(1, max_n + 1):
        ctx, best, count, total, alt, alt_count = count_ngrams(docs, n, min_count)
        slots = 1 << max(4, int(np.ceil(np.log2(max(1, len(ctx)) / load))))
        where = _place(ctx, count, slots)
        ok = where >= 0
        k = np.full((slots, n), -1, np.int32)
        v = np.zeros(slots, np.int32)
        c = np.zeros(slots, np.float32)
        a = np.full(slots, -1, np.int32)
        ac = np.zeros(slots, np.float32)
        k[where[ok]], v[where[ok]], c[where[ok]] = ctx[ok], best[ok], (count / total)[ok]
        a[where[ok]], ac[where[ok]] = alt[ok], (alt_count / total)[ok]
        keys.append(jnp.asarray(k)), nxt.append(jnp.asarray(v)), conf.append(jnp.asarray(c))
        alts.append(jnp.asarray(a)), alt_conf.append(jnp.asarray(ac))
    return NGramTable(keys=tuple(keys), next=tuple(nxt), conf=tuple(conf), alt=tuple(alts), alt_conf=tuple(alt_conf))


def _slot(table: NGramTable, ctx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``ctx [B, n]`` -> (found [B] bool, its slot in the table of length-n contexts [B])."""
    n = ctx.shape[1]
    keys = table.keys[n - 1]
    M = keys.shape[0]
    h = _hash([ctx[:, j] for j in range(n)], jnp)
    slots = ((h[:, None] + jnp.arange(PROBES, dtype=jnp.uint32)[None, :]) & jnp.uint32(M - 1)).astype(jnp.int32)
    match = jnp.all(keys[slots] == ctx[:, None, :], axis=-1)  # [B, PROBES]
    return match.any(1), jnp.take_along_axis(slots, jnp.argmax(match, axis=1)[:, None], axis=1)[:, 0]


def lookup(table: NGramTable, ctx: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``ctx [B, n]`` (n <= table.max_n) -> (found [B] bool, next [B] int32, conf [B])."""
    found, slot = _slot(table, ctx)
    n = ctx.shape[1]
    return found, table.next[n - 1][slot], table.conf[n - 1][slot]


def longest_context(table: NGramTable, seq: jax.Array, end: jax.Array):
    """The datastore's entry for the longest stored context ending before ``end [B]``:
    ``(found, next, conf, alt, alt_conf)``, each ``[B]``."""
    B = seq.shape[0]
    found = jnp.zeros((B,), bool)
    out = [jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.float32), jnp.full((B,), -1, jnp.int32),
           jnp.zeros((B,), jnp.float32)]
    for n in range(table.max_n, 0, -1):
        ctx, has = _suffix(seq, end, n)
        hit, slot = _slot(table, ctx)
        hit = ~found & hit & has
        vals = (table.next[n - 1], table.conf[n - 1], table.alt[n - 1], table.alt_conf[n - 1])
        out = [jnp.where(hit, v[slot], o) for v, o in zip(vals, out)]
        found = found | hit
    return (found, *out)


def table_draft(table: NGramTable, seq: jax.Array, seq_len: jax.Array, live: jax.Array, k: int,
                min_conf: float) -> tuple[jax.Array, jax.Array]:
    """Up to ``k`` tokens per row after ``seq[:, :seq_len]`` from the datastore alone:
    ``(tokens [B, k], n [B])``."""
    B = seq.shape[0]
    ext = seq
    tokens = jnp.zeros((B, k), jnp.int32)
    active = live
    n_draft = jnp.zeros((B,), jnp.int32)
    for i in range(k):
        end = seq_len + i  # the context ends before position `end`
        found, nxt, conf, _, _ = longest_context(table, ext, end)
        active = active & found & (conf >= min_conf)
        tokens = tokens.at[:, i].set(jnp.where(active, nxt, 0))
        n_draft = n_draft + active.astype(jnp.int32)
        ext = write_token(ext, nxt, end)
    return tokens, n_draft


@dataclasses.dataclass(frozen=True)
class RetrievalProposer(ChainProposer):
    """Prompt lookup; a row with no match in its own context drafts from the datastore
    (``pparams``, an ``NGramTable``) instead."""

    k: int = 5
    max_ngram: int = 3  # prompt lookup's n-gram sizes
    min_ngram: int = 1
    min_conf: float = 0.3  # datastore drafting stops at a continuation with a smaller share
    prompt_lookup: bool = True  # False: the datastore alone (an ablation)

    def __post_init__(self):
        _check_sizes(self.k, self.min_ngram, self.max_ngram)
        if not 0.0 <= self.min_conf <= 1.0:
            raise ValueError(f"retrieval min_conf={self.min_conf} must be in [0, 1]")

    def init(self, tparams, pparams, prompt, prompt_len, cache_len):
        return ()

    def propose(self, tparams, table: NGramTable, st, ctx: Context, sp, rng):
        if not self.prompt_lookup:
            tokens, n = table_draft(table, ctx.seq, ctx.seq_len, ctx.live, self.k, self.min_conf)
            return Proposal(tokens=tokens, n=n), st
        lookup_prop = PromptLookupProposer(k=self.k, max_ngram=self.max_ngram, min_ngram=self.min_ngram)
        pl, _ = lookup_prop.propose(tparams, None, (), ctx, sp, rng)
        tokens, n = table_draft(table, ctx.seq, ctx.seq_len, ctx.live & (pl.n == 0), self.k, self.min_conf)
        use_pl = pl.n > 0
        return Proposal(tokens=jnp.where(use_pl[:, None], pl.tokens, tokens), n=jnp.where(use_pl, pl.n, n)), st


def _common_prefix(a: jax.Array, b: jax.Array, limit: jax.Array) -> jax.Array:
    """Length of the common prefix of ``a, b [B, K]`` within the first ``limit [B]`` tokens."""
    K = a.shape[1]
    eq = (a == b) & (jnp.arange(K, dtype=jnp.int32)[None, :] < limit[:, None])
    return jnp.cumprod(eq.astype(jnp.int32), axis=1).sum(1)


def merge_into_tree(cand: jax.Array, n_cand: jax.Array, branches: tuple[int, ...], live: jax.Array) -> Tree:
    """A token tree (a trie) of candidate continuations ``cand [B, C, K]`` (``n_cand [B, C]``
    tokens each, candidates in priority order, empty ones skipped).

    The ``m``-th non-empty candidate gets ``branches[m]`` node slots: it shares the longest
    prefix it has with a candidate already in the tree and its next ``branches[m]`` tokens hang
    below that shared node (the root when nothing is shared). So no two siblings repeat a token,
    and a candidate that the tree already holds adds nothing. Node depth is at most ``K``. The
    valid nodes come first (``valid_first``), so a small tree gets a short verify pass."""
    B, C, K = cand.shape
    G = len(branches)
    # Compact the non-empty candidates to the front, keeping their order.
    nonempty = n_cand > 0
    rank = jnp.cumsum(nonempty, axis=1) - 1
    src = jnp.full((B, G), C, jnp.int32)  # candidate index of group m (C: none)
    for c in range(C):
        src = jnp.where(nonempty[:, c:c + 1] & (rank[:, c:c + 1] == jnp.arange(G)[None, :]), c, src)
    padded = jnp.concatenate([cand, jnp.zeros((B, 1, K), cand.dtype)], axis=1)
    lens = jnp.concatenate([n_cand, jnp.zeros((B, 1), n_cand.dtype)], axis=1)
    gtok = jnp.take_along_axis(padded, src[:, :, None], axis=1)  # [B, G, K]
    glen = jnp.take_along_axis(lens, src, axis=1) * live[:, None]  # [B, G]

    ar = jnp.arange(K, dtype=jnp.int32)[None, :]
    tokens, parents, valid = [], [], []
    node_at, rep = [], []  # per group: node index at each depth [B, K] (-1: none), tokens held [B]
    base = 0
    for m, width in enumerate(branches):
        shared = jnp.zeros((B,), jnp.int32)
        at = jnp.full((B, K), -1, jnp.int32)
        for mm in range(m):  # the earlier group sharing the longest prefix (the first on ties)
            lcp = _common_prefix(gtok[:, m], gtok[:, mm], jnp.minimum(rep[mm], glen[:, m]))
            better = lcp > shared
            shared = jnp.where(better, lcp, shared)
            at = jnp.where(better[:, None], node_at[mm], at)
        at_shared = jnp.take_along_axis(at, jnp.maximum(shared - 1, 0)[:, None], axis=1)[:, 0]
        first_parent = jnp.where(shared > 0, at_shared, -1)
        idx = shared[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]  # candidate positions held
        tokens.append(jnp.take_along_axis(gtok[:, m], jnp.minimum(idx, K - 1), axis=1))
        valid.append(idx < glen[:, m:m + 1])
        own = base + jnp.arange(width, dtype=jnp.int32)[None, :]
        parents.append(jnp.concatenate([first_parent[:, None], jnp.broadcast_to(own[:, :-1], (B, width - 1))], axis=1))
        held = jnp.minimum(glen[:, m], shared + width)
        node_at.append(jnp.where(ar < shared[:, None], at, jnp.where(ar < held[:, None], base + ar - shared[:, None], -1)))
        rep.append(held)
        base += width
    return valid_first(Tree(tokens=jnp.concatenate(tokens, 1).astype(jnp.int32),
                            parents=jnp.concatenate(parents, 1), valid=jnp.concatenate(valid, 1)))


@dataclasses.dataclass(frozen=True)
class RetrievalTreeProposer(TreeProposer):
    """Retrieval drafts as a token tree (REST verifies a trie of retrieved continuations):
    the candidates, in priority order, are

    1. prompt lookup's continuation of the latest match in the row's own context,
    2. the datastore's chain (``table_draft``),
    3. the datastore's runner-up next token (when its share is at least ``alt_min_conf``)
       followed by the datastore's chain after it,

    each up to ``k = branches[0]`` tokens, merged into one trie by ``merge_into_tree``:
    the ``m``-th non-empty candidate gets ``branches[m]`` nodes below the longest prefix it
    shares with the earlier ones. Deterministic nodes (q one-hot): lossless under greedy and
    recursive-rejection verification alike. ``pparams`` is the ``NGramTable``."""

    branches: tuple[int, ...] = (5, 2, 2)
    max_ngram: int = 3  # prompt lookup's n-gram sizes
    min_ngram: int = 1
    min_conf: float = 0.3  # datastore chains stop at a continuation with a smaller share
    alt_min_conf: float = 0.1  # the runner-up's share needed to draft it

    def __post_init__(self):
        _check_sizes(self.k, self.min_ngram, self.max_ngram)
        if not self.branches or min(self.branches) < 1 or max(self.branches) != self.branches[0]:
            raise ValueError(f"retrieval tree branches={self.branches}: need >= 1 node each, the first the largest")
        if not (0.0 <= self.min_conf <= 1.0 and 0.0 <= self.alt_min_conf <= 1.0):
            raise ValueError(f"retrieval min_conf={self.min_conf}, alt_min_conf={self.alt_min_conf}: need [0, 1]")

    @property
    def k(self) -> int:
        return self.branches[0]

    @property
    def n_nodes(self) -> int:
        return sum(self.branches)

    @property
    def max_depth(self) -> int:
        return self.k

    @property
    def verify_sizes(self) -> tuple[int, ...]:
        """Pass lengths for the tree loop: 1, 2, 4, .. and 1 + n_nodes (valid nodes come first)."""
        from tokax.decode.loop import verify_block_sizes

        return verify_block_sizes(self.n_nodes, None)

    def init(self, tparams, pparams, prompt, prompt_len, cache_len):
        return ()

    def propose(self, tparams, table: NGramTable, st, ctx: Context, sp, rng):
        K, B = self.k, ctx.seq.shape[0]
        pl, _ = PromptLookupProposer(k=K, max_ngram=self.max_ngram, min_ngram=self.min_ngram).propose(
            tparams, None, (), ctx, sp, rng)
        found, _, _, alt, alt_conf = longest_context(table, ctx.seq, ctx.seq_len)
        has_alt = ctx.live & found & (alt >= 0) & (alt_conf >= self.alt_min_conf)
        # Both datastore chains in one batched call: rows from the context, then rows from the
        # context followed by the runner-up.
        ext = write_token(ctx.seq, jnp.maximum(alt, 0), ctx.seq_len)
        chains, n_chain = table_draft(table, jnp.concatenate([ctx.seq, ext]),
                                      jnp.concatenate([ctx.seq_len, ctx.seq_len + 1]),
                                      jnp.concatenate([ctx.live, has_alt]), K, self.min_conf)
        alt_chain = jnp.concatenate([jnp.maximum(alt, 0)[:, None], chains[B:, :K - 1]], axis=1)
        n_alt = jnp.where(has_alt, 1 + jnp.minimum(n_chain[B:], K - 1), 0)
        cand = jnp.stack([pl.tokens, chains[:B], alt_chain], axis=1)
        n_cand = jnp.stack([pl.n, n_chain[:B], n_alt], axis=1)
        return merge_into_tree(cand, n_cand, self.branches, ctx.live), st


def stdlib_table(tokenizer, max_n: int = 3, min_count: int = 2, split: str = "train") -> NGramTable:
    """The datastore of the Python standard library's source (``split`` of
    ``tokax.data.stdlib.stdlib_files``; the benchmark's code prompts come from the other split)."""
    return build_table(stdlib_docs(tokenizer, split), max_n=max_n, min_count=min_count)


CORPORA = ("stdlib", "greedy", "stdlib+greedy")


def corpus_table(tokenizer, corpus: str, max_n: int = 3, min_count: int = 2, greedy_weight: int = 1) -> NGramTable:
    """``corpus``: 'stdlib' (the standard library's training split), 'greedy' (the target's own
    greedy continuations of training-split code, ``greedy_corpus_docs``: Gemma 3 270M's habits,
    so only useful for that target), 'stdlib+greedy' (both, each greedy continuation counted
    ``greedy_weight`` times), or a directory whose ``.py``, ``.txt`` and ``.md`` files
    (recursively) are the documents."""
    if corpus in CORPORA:
        if greedy_weight < 1:
            raise ValueError(f"greedy_weight={greedy_weight}: need >= 1")
        docs = stdlib_docs(tokenizer) if "stdlib" in corpus else []
        docs += greedy_corpus_docs() * greedy_weight if "greedy" in corpus else []
        return build_table(docs, max_n=max_n, min_count=min_count)
    import os

    if not os.path.isdir(corpus):
        raise ValueError(f"retrieval corpus {corpus!r}: use one of {CORPORA} or a directory of .py/.txt/.md files")
    paths = []
    for root, dirs, files in os.walk(corpus):
        dirs.sort()
        paths += [os.path.join(root, fn) for fn in sorted(files) if fn.endswith((".py", ".txt", ".md"))]
    if not paths:
        raise ValueError(f"retrieval corpus {corpus!r} has no .py/.txt/.md files")
    return build_table(token_docs(tokenizer, paths), max_n=max_n, min_count=min_count)
