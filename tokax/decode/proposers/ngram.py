"""Training-free drafts from n-gram matches in the context.

Prompt lookup decoding (Saxena 2023; the "aggressive decoding" idea of Ge et
al. for rewriting): find the latest earlier occurrence of the last ``n``
tokens in the row's history (prompt + generated) and propose the tokens that
followed it, up to ``K``; try ``n = max_ngram`` first and fall back to
shorter n-grams.

ANPD, adaptive n-gram parallel decoding (Ou et al. 2024): an n-gram table
built from the context and updated online with every generated token drafts
token by token: the next draft is the token that followed the latest
occurrence of the last ``n`` tokens of (history + drafts so far), with
multi-level fallback (largest ``n`` first, then shorter).
Here the table is implicit: the "latest continuation" of a context is found
by matching against the history, which is the table kept up to date for
free. Online adaptation, per row: the largest n-gram size tried, ``n``,
rises by one after a round whose first draft was rejected (short contexts
mislead) and falls by one after a round accepted in full; the draft length
rises by one after full acceptance and falls by one after a rejection.

Both are deterministic proposals: the verifier treats q as one-hot, so
sampling stays exact (accept x with prob p(x), else sample p with x removed).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from tokax.decode.proposers.base import ChainProposer, Context, Proposal


def latest_match(seq: jax.Array, seq_len: jax.Array, suffix: jax.Array, limit: jax.Array) -> jax.Array:
    """Largest ``j`` with ``seq[b, j:j+n] == suffix[b]`` and ``j + n < limit[b]``
    (so at least one following token is known), else -1.
    seq ``[B, S]``, suffix ``[B, n]``, limit ``[B]`` -> ``[B]`` int32."""
    B, S = seq.shape
    n = suffix.shape[1]
    W = S - n  # candidate starts 0 .. S-n-1 (j + n <= S - 1)
    eq = jnp.ones((B, W), bool)
    for k in range(n):
        eq = eq & (seq[:, k : k + W] == suffix[:, k : k + 1])
    j = jnp.arange(W, dtype=jnp.int32)[None, :]
    ok = eq & (j + n < limit[:, None])
    return jnp.max(jnp.where(ok, j, -1), axis=1)


def _suffix(seq: jax.Array, end: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """The ``n`` tokens before ``end [B]`` ``[B, n]``, and whether they exist."""
    idx = end[:, None] - n + jnp.arange(n, dtype=jnp.int32)[None, :]
    return jnp.take_along_axis(seq, jnp.clip(idx, 0, seq.shape[1] - 1), axis=1), end >= n


def write_token(seq: jax.Array, tok: jax.Array, pos: jax.Array) -> jax.Array:
    """``seq [B, S]`` with ``tok [B]`` written at ``pos [B]`` (clamped at the buffer end): a
    draft appended to the history so the next draft token's context includes it."""
    return jax.vmap(lambda r, t, p: jax.lax.dynamic_update_slice(r, t[None], (p,)))(seq, tok, pos)


def _check_sizes(k: int, min_ngram: int, max_ngram: int):
    if k < 1:
        raise ValueError(f"k={k}: the number of draft tokens per round must be >= 1")
    if not 1 <= min_ngram <= max_ngram:
        raise ValueError(f"ngram sizes min_ngram={min_ngram}, max_ngram={max_ngram}: need 1 <= min <= max")


@dataclasses.dataclass(frozen=True)
class PromptLookupProposer(ChainProposer):
    """No match, no draft (``can_be_empty``): the loop then runs a one-token target pass."""

    k: int = 5
    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self):
        _check_sizes(self.k, self.min_ngram, self.max_ngram)

    def init(self, tparams, pparams, prompt, prompt_len, cache_len):
        return ()

    def propose(self, tparams, pparams, st, ctx: Context, sp, rng):
        seq, L = ctx.seq, ctx.seq_len
        B, S = seq.shape
        found = jnp.zeros((B,), bool)
        cont = jnp.zeros((B,), jnp.int32)  # index of the first continuation token
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            suf, has = _suffix(seq, L, n)
            j = latest_match(seq, L, suf, L)
            hit = ~found & has & (j >= 0)
            cont = jnp.where(hit, j + n, cont)
            found = found | hit
        idx = cont[:, None] + jnp.arange(self.k, dtype=jnp.int32)[None, :]
        tokens = jnp.take_along_axis(seq, jnp.clip(idx, 0, S - 1), axis=1)
        n_draft = jnp.where(found & ctx.live, jnp.minimum(self.k, L - cont), 0).astype(jnp.int32)
        return Proposal(tokens=tokens, n=n_draft), st


@struct.dataclass
class ANPDState:
    n: jax.Array  # [B] largest n-gram size tried
    k: jax.Array  # [B] current draft length


@dataclasses.dataclass(frozen=True)
class ANPDProposer(ChainProposer):
    k: int = 5  # maximum draft length
    max_ngram: int = 4
    min_ngram: int = 1
    init_ngram: int = 2

    def __post_init__(self):
        _check_sizes(self.k, self.min_ngram, self.max_ngram)
        if not self.min_ngram <= self.init_ngram <= self.max_ngram:
            raise ValueError(f"anpd init_ngram={self.init_ngram} must be in [min_ngram, max_ngram]")

    def init(self, tparams, pparams, prompt, prompt_len, cache_len) -> ANPDState:
        B = prompt.shape[0]
        return ANPDState(n=jnp.full((B,), self.init_ngram, jnp.int32), k=jnp.full((B,), self.k, jnp.int32))

    def propose(self, tparams, pparams, st: ANPDState, ctx: Context, sp, rng):
        seq, L = ctx.seq, ctx.seq_len
        B, S = seq.shape
        ext = seq  # history with the drafts written after it
        tokens = jnp.zeros((B, self.k), jnp.int32)
        active = ctx.live
        n_draft = jnp.zeros((B,), jnp.int32)
        for i in range(self.k):  # draft token i from the context ending at L + i
            found = jnp.zeros((B,), bool)
            nxt = jnp.zeros((B,), jnp.int32)
            for n in range(self.max_ngram, self.min_ngram - 1, -1):
                suf, has = _suffix(ext, L + i, n)
                j = latest_match(seq, L, suf, L)  # the table: accepted history only
                hit = ~found & has & (j >= 0) & (n <= st.n)
                nxt = jnp.where(hit, jnp.take_along_axis(seq, jnp.clip(j + n, 0, S - 1)[:, None], 1)[:, 0], nxt)
                found = found | hit
            active = active & found & (i < st.k)
            tokens = tokens.at[:, i].set(jnp.where(active, nxt, 0))
            n_draft = n_draft + active.astype(jnp.int32)
            # Write the draft so the next token's context includes it (clamped at the buffer end;
            # a row that far along is never active, S leaves room for K drafts).
            ext = write_token(ext, nxt, L + i)
        return Proposal(tokens=tokens, n=n_draft), st

    def update(self, st: ANPDState, ctx, n_draft, n_acc, live) -> ANPDState:
        drafted = live & (n_draft > 0)
        all_in = drafted & (n_acc == n_draft)
        first_out = drafted & (n_acc == 0)
        n = jnp.where(first_out, st.n + 1, jnp.where(all_in, st.n - 1, st.n))
        k = jnp.where(all_in, st.k + 1, jnp.where(drafted & ~all_in, st.k - 1, st.k))
        return ANPDState(n=jnp.clip(n, self.min_ngram, self.max_ngram), k=jnp.clip(k, 1, self.k))
