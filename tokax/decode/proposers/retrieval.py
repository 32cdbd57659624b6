"""Retrieval drafts: prompt lookup, else an n-gram datastore built from a corpus.

Prompt lookup (``ngram.PromptLookupProposer``) drafts only when the last
tokens already occurred in the context. On new text (code the model writes
from scratch) about a third of the rounds find no match and verify nothing.
This proposer fills those rounds from a static datastore, in the spirit of
REST (He et al. 2023, retrieval-based speculative decoding): for every
context of ``1..max_n`` tokens seen in a corpus, the datastore holds the
token that most often followed it and that token's share of the context's
continuations (its confidence). A draft is built token by token from the
longest stored context ending at (history + drafts so far); drafting stops
at a context the datastore lacks or whose confidence is under ``min_conf``.
REST retrieves by exact suffix match over a suffix array and verifies a
trie of continuations; here the datastore is a fixed-size hash table per
context length and the draft is one chain, so it runs inside the jitted
loop with static shapes.

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

from tokax.decode.proposers import Context, Proposal
from tokax.decode.proposers.ngram import PromptLookupProposer, _check_sizes, _suffix, write_token

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

    @property
    def max_n(self) -> int:
        return len(self.keys)


def count_ngrams(docs: Iterable[np.ndarray], n: int, min_count: int = 1):
    """For every context of ``n`` tokens inside one document: the most frequent next token
    (ties: the smallest id), its count and the context's total count.
    Returns ``(ctx [E, n] int32, next [E], count [E], total [E])``, contexts in sorted order."""
    rows = []
    for d in docs:
        d = np.asarray(d, np.int32)
        if len(d) > n:
            rows.append(np.lib.stride_tricks.sliding_window_view(d, n + 1))
    if not rows:
        z = np.zeros((0,), np.int64)
        return np.zeros((0, n), np.int32), z.astype(np.int32), z, z
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
    # Per context the pair with the largest count; pairs are sorted by next id within a context,
    # so a stable sort by (group, -count) puts the smallest id first among ties.
    o = np.lexsort((-pair_count, group))
    best = o[np.concatenate([[True], group[o][1:] != group[o][:-1]])]
    keep = pair_count[best] >= min_count
    best = best[keep]
    return ctx[best].astype(np.int32), pairs[best, n].astype(np.int32), pair_count[best], total[group[best]]


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
    keys, nxt, conf = [], [], []
    for n in range(1, max_n + 1):
        ctx, best, count, total = count_ngrams(docs, n, min_count)
        slots = 1 << max(4, int(np.ceil(np.log2(max(1, len(ctx)) / load))))
        where = _place(ctx, count, slots)
        ok = where >= 0
        k = np.full((slots, n), -1, np.int32)
        v = np.zeros(slots, np.int32)
        c = np.zeros(slots, np.float32)
        k[where[ok]], v[where[ok]], c[where[ok]] = ctx[ok], best[ok], (count / total)[ok]
        keys.append(jnp.asarray(k)), nxt.append(jnp.asarray(v)), conf.append(jnp.asarray(c))
    return NGramTable(keys=tuple(keys), next=tuple(nxt), conf=tuple(conf))


def lookup(table: NGramTable, ctx: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``ctx [B, n]`` (n <= table.max_n) -> (found [B] bool, next [B] int32, conf [B])."""
    n = ctx.shape[1]
    keys, nxt, conf = table.keys[n - 1], table.next[n - 1], table.conf[n - 1]
    M = keys.shape[0]
    h = _hash([ctx[:, j] for j in range(n)], jnp)
    slots = ((h[:, None] + jnp.arange(PROBES, dtype=jnp.uint32)[None, :]) & jnp.uint32(M - 1)).astype(jnp.int32)
    match = jnp.all(keys[slots] == ctx[:, None, :], axis=-1)  # [B, PROBES]
    slot = jnp.take_along_axis(slots, jnp.argmax(match, axis=1)[:, None], axis=1)[:, 0]
    return match.any(1), nxt[slot], conf[slot]


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
        found = jnp.zeros((B,), bool)
        nxt = jnp.zeros((B,), jnp.int32)
        good = jnp.zeros((B,), bool)
        for n in range(table.max_n, 0, -1):  # the longest stored context decides
            ctx, has = _suffix(ext, end, n)
            hit, tok, c = lookup(table, ctx)
            hit = ~found & hit & has
            nxt = jnp.where(hit, tok, nxt)
            good = jnp.where(hit, c >= min_conf, good)
            found = found | hit
        active = active & found & good
        tokens = tokens.at[:, i].set(jnp.where(active, nxt, 0))
        n_draft = n_draft + active.astype(jnp.int32)
        ext = write_token(ext, nxt, end)
    return tokens, n_draft


@dataclasses.dataclass(frozen=True)
class RetrievalProposer:
    """Prompt lookup; a row with no match in its own context drafts from the datastore
    (``pparams``, an ``NGramTable``) instead."""

    k: int = 5
    max_ngram: int = 3  # prompt lookup's n-gram sizes
    min_ngram: int = 1
    min_conf: float = 0.3  # datastore drafting stops at a continuation with a smaller share
    prompt_lookup: bool = True  # False: the datastore alone (an ablation)
    can_be_empty = True

    def __post_init__(self):
        _check_sizes(self.k, self.min_ngram, self.max_ngram)
        if not 0.0 <= self.min_conf <= 1.0:
            raise ValueError(f"retrieval min_conf={self.min_conf} must be in [0, 1]")

    def check(self, target_cfg) -> None:
        pass

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

    def update(self, st, ctx, n_draft, n_acc, live):
        return st


def _tokenized(tokenizer, paths) -> list[np.ndarray]:
    docs = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            docs.append(np.asarray(tokenizer.encode(f.read(), add_bos=True), np.int32))
    return docs


def stdlib_table(tokenizer, max_n: int = 3, min_count: int = 2, split: str = "train") -> NGramTable:
    """The datastore of the Python standard library's source (``split`` of
    ``tokax.train.data.stdlib_files``; the benchmark's code prompts come from the other split)."""
    from tokax.train.data import stdlib_files

    return build_table(_tokenized(tokenizer, stdlib_files(split)), max_n=max_n, min_count=min_count)


def corpus_table(tokenizer, corpus: str, max_n: int = 3, min_count: int = 2) -> NGramTable:
    """``corpus``: 'stdlib' (the standard library's training split) or a directory whose
    ``.py``, ``.txt`` and ``.md`` files (recursively) are the documents."""
    if corpus == "stdlib":
        return stdlib_table(tokenizer, max_n, min_count)
    import os

    if not os.path.isdir(corpus):
        raise ValueError(f"retrieval corpus {corpus!r}: use 'stdlib' or a directory of .py/.txt/.md files")
    paths = []
    for root, dirs, files in os.walk(corpus):
        dirs.sort()
        paths += [os.path.join(root, fn) for fn in sorted(files) if fn.endswith((".py", ".txt", ".md"))]
    if not paths:
        raise ValueError(f"retrieval corpus {corpus!r} has no .py/.txt/.md files")
    return build_table(_tokenized(tokenizer, paths), max_n=max_n, min_count=min_count)
