"""Lookahead decoding (Fu et al. 2024, "Break the Sequential Dependency of
LLM Inference Using Lookahead Decoding"), as far as the chain loop allows.

The paper, per step: a *lookahead branch* runs Jacobi iteration on a 2D
window (``W`` future positions x ``N - 1`` past iterations): each guess at
position ``j`` is updated to ``argmax p(. | prefix, guesses < j)``, and the
diagonal trajectories of the window give n-grams (each token produced with
the previous n-gram token as its immediate input) that go into an n-gram
pool keyed by their first token. A *verification branch* checks up to
``G`` pool n-grams starting with the last token. Both branches run in the
same forward pass under a special attention mask; the output is exact
(greedy prefix match, or speculative sampling of deterministic drafts).

Here (one chain of ``K`` drafts per target pass, ``tokax.decode.speculative``):

* The verify pass of ``[last, x_1..x_K]`` *is* the Jacobi step: the target's
  argmax ``y_i`` at block position ``i`` is the updated guess for the
  position after ``x_i`` (recovered by unembedding the hidden states given to
  ``observe``; one extra ``[K+1, V]`` product per round because the
  loop does not hand over its logits). After ``n_acc`` accepted drafts the
  window shifts: the next guesses are ``y_{n_acc+1..K}`` (Jacobi), padded
  with ``y_K`` where the window has run past what the pass computed.
* n-grams follow the paper's diagonals: every block input carries the
  ``N - 2`` tokens that preceded it along its Jacobi trajectory
  (``trail``), and each pass adds ``(trail_i, x_i, y_i)`` for all ``K + 1``
  block positions to a per-row pool (hash buckets ``last % P``, ``G`` slots
  each, round-robin, duplicates skipped).
* Drafts: if the pool has an n-gram starting with the newest token, its
  ``N - 1`` continuation tokens are the first drafts (the most recently
  added one; the paper verifies up to ``G`` of them in parallel branches,
  the chain verifies one) and the rest of the chain is the Jacobi window;
  otherwise the whole chain is the Jacobi window (plain Jacobi decoding).

What differs from the paper: one verification candidate per pass instead
of ``G``; the lookahead window is the verified chain itself (1D, ``W = K``,
its guesses are both Jacobi iterates and drafts), not a separate 2D
branch with its own mask, so a round's window starts from the previous
round's outputs and the ``N - 1`` past iterations live in the per-token
``trail`` rather than in extra rows of the pass; the window starts from
the prompt's last ``K`` tokens. Output is exact either way: drafts are
deterministic (q one-hot), verified by ``tokax.decode.verify``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from tokax.decode.proposers.base import ChainProposer, Context, Proposal


@struct.dataclass
class LookaheadState:
    keys: jax.Array  # [B, P, G] first token of each pooled n-gram (-1 = empty slot)
    vals: jax.Array  # [B, P, G, N-1] its continuation
    ptr: jax.Array  # [B, P] insertions per bucket (next slot = ptr % G)
    window: jax.Array  # [B, K] initial Jacobi guesses (the prompt's last K tokens)
    block: jax.Array  # [B, K+1] inputs of the last target pass [last, x_1..x_K]
    trail: jax.Array  # [B, K+1, N-2] their Jacobi-trajectory predecessors (-1 = unknown)
    hidden: jax.Array  # [B, K+1, D] the target's hidden states of that pass
    n_acc: jax.Array  # [B] drafts it accepted
    seen: jax.Array  # [B] bool, a pass has been observed


def _insert_row(keys, vals, ptr, grams, ok):
    """Add n-grams ``grams [M, N]`` (where ``ok [M]``) to one row's pool, skipping duplicates."""
    P, G = keys.shape
    for m in range(grams.shape[0]):
        key, cont = grams[m, 0], grams[m, 1:]
        bkt = jnp.mod(key, P)
        dup = jnp.any((keys[bkt] == key) & jnp.all(vals[bkt] == cont[None], axis=-1))
        do = ok[m] & ~dup
        slot = jnp.mod(ptr[bkt], G)
        keys = keys.at[bkt, slot].set(jnp.where(do, key, keys[bkt, slot]))
        vals = vals.at[bkt, slot].set(jnp.where(do, cont, vals[bkt, slot]))
        ptr = ptr.at[bkt].add(do.astype(jnp.int32))
    return keys, vals, ptr


def _lookup_row(keys, vals, ptr, key):
    """The most recently added n-gram continuation starting with ``key``, and whether one exists."""
    P, G = keys.shape
    bkt = jnp.mod(key, P)
    match = keys[bkt] == key  # [G]
    age = jnp.mod(ptr[bkt] - 1 - jnp.arange(G), G)  # 0 = newest slot
    g = jnp.argmin(jnp.where(match, age, G))
    return vals[bkt, g], jnp.any(match)


@dataclasses.dataclass(frozen=True)
class LookaheadProposer(ChainProposer):
    k: int = 5  # chain length = Jacobi window W
    ngram: int = 4  # N: pooled n-grams are N tokens (key + N-1 drafts)
    pool_buckets: int = 1024  # P hash buckets per row
    pool_slots: int = 4  # G n-grams per bucket
    can_be_empty = False  # every round drafts (Jacobi guesses at worst); class constants, not fields
    reads_target_hidden = True

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"lookahead k={self.k} must be >= 1")
        if not 2 <= self.ngram <= self.k + 1:
            raise ValueError(f"lookahead ngram={self.ngram} must be in [2, k+1={self.k + 1}]")
        if self.pool_buckets < 1 or self.pool_slots < 1:
            raise ValueError("lookahead pool_buckets and pool_slots must be >= 1")

    def init(self, tparams, pparams, prompt, prompt_len, cache_len) -> LookaheadState:
        B = prompt.shape[0]
        K, N, P, G = self.k, self.ngram, self.pool_buckets, self.pool_slots
        D = tparams["embed"].shape[1]
        idx = jnp.clip(prompt_len[:, None] - K + jnp.arange(K)[None, :], 0, prompt.shape[1] - 1)
        return LookaheadState(
            keys=jnp.full((B, P, G), -1, jnp.int32),
            vals=jnp.zeros((B, P, G, N - 1), jnp.int32),
            ptr=jnp.zeros((B, P), jnp.int32),
            window=jnp.take_along_axis(prompt.astype(jnp.int32), idx, axis=1),
            block=jnp.zeros((B, K + 1), jnp.int32),
            trail=jnp.full((B, K + 1, N - 2), -1, jnp.int32),
            hidden=jnp.zeros((B, K + 1, D), jnp.float32),
            n_acc=jnp.zeros((B,), jnp.int32),
            seen=jnp.zeros((B,), bool),
        )

    def jacobi(self, tparams, st: LookaheadState):
        """Pool the last pass's diagonal n-grams and shift its Jacobi guesses:
        returns (state with the pool updated, window ``[B, K]``, trail of
        ``[last, window]`` ``[B, K+1, N-2]``)."""
        K = self.k
        emb = tparams["embed"]
        y = jnp.argmax(jnp.einsum("bkd,vd->bkv", st.hidden.astype(emb.dtype), emb,
                                  preferred_element_type=jnp.float32), -1).astype(jnp.int32)  # [B, K+1]
        grams = jnp.concatenate([st.trail, st.block[..., None], y[..., None]], axis=-1)  # [B, K+1, N]
        ok = st.seen[:, None] & jnp.all(grams >= 0, axis=-1)
        keys, vals, ptr = jax.vmap(_insert_row)(st.keys, st.vals, st.ptr, grams, ok)
        # The newest token sits at block index a+1 (produced by y_a from x_a); the guess for
        # window slot j is y_{a+j}, produced from input x_{a+j}: its trail gains x_{a+j}.
        a = st.n_acc
        src = a[:, None] + jnp.arange(K + 1)[None, :]  # [B, K+1] block index producing slot j (j=0: newest)
        have = src <= K
        srcc = jnp.minimum(src, K)
        new_tok = jnp.take_along_axis(y, srcc, axis=1)
        win = jnp.where(have, new_tok, y[:, K:K + 1])[:, 1:]
        prev = jnp.take_along_axis(st.trail, srcc[..., None], axis=1)  # [B, K+1, N-2]
        inp = jnp.take_along_axis(st.block, srcc, axis=1)[..., None]
        trail = jnp.concatenate([prev, inp], axis=-1)[..., 1:]
        trail = jnp.where(have[..., None], trail, -1)
        win = jnp.where(st.seen[:, None], win, st.window)
        trail = jnp.where(st.seen[:, None, None], trail, -1)
        return st.replace(keys=keys, vals=vals, ptr=ptr), win, trail

    def propose(self, tparams, pparams, st: LookaheadState, ctx: Context, sp, rng):
        K, N = self.k, self.ngram
        st, win, wtrail = self.jacobi(tparams, st)
        last = jnp.take_along_axis(ctx.seq, (ctx.seq_len - 1)[:, None], axis=1)  # [B, 1]
        cont, hit = jax.vmap(_lookup_row)(st.keys, st.vals, st.ptr, last[:, 0])  # [B, N-1], [B]
        j = jnp.arange(K)[None, :]
        pool_part = jnp.pad(cont, ((0, 0), (0, K - (N - 1))))
        drafts = jnp.where(hit[:, None] & (j < N - 1), pool_part, win)  # [B, K]
        block = jnp.concatenate([last, drafts], axis=1)  # [B, K+1]
        # Pool drafts' trail: the tokens before them in the chain (history, then block).
        e = jnp.arange(K + 1)[:, None] - (N - 2) + jnp.arange(N - 2)[None, :]  # [K+1, N-2] block index
        hist = ctx.seq_len[:, None, None] - 1 + e[None]  # [B, K+1, N-2] history index when e < 0
        from_hist = jnp.take_along_axis(ctx.seq, jnp.clip(hist, 0, ctx.seq.shape[1] - 1).reshape(hist.shape[0], -1),
                                        axis=1).reshape(hist.shape)
        from_block = jnp.take_along_axis(block, jnp.clip(e, 0, K).reshape(1, -1).repeat(block.shape[0], 0),
                                         axis=1).reshape(hist.shape)
        ptrail = jnp.where(e[None] >= 0, from_block, jnp.where(hist >= 0, from_hist, -1))
        in_pool = hit[:, None] & (jnp.arange(K + 1)[None, :] >= 1) & (jnp.arange(K + 1)[None, :] <= N - 1)
        trail = jnp.where(in_pool[..., None], ptrail, wtrail)
        n = jnp.where(ctx.live, K, 0).astype(jnp.int32)
        return Proposal(tokens=drafts, n=n), st.replace(block=block, trail=trail)

    def observe(self, st: LookaheadState, out) -> LookaheadState:
        """Keep the verify pass's hidden states (its Jacobi guesses) and accepted count."""
        live = out.live
        return st.replace(
            hidden=jnp.where(live[:, None, None], out.hidden.astype(jnp.float32), st.hidden),
            n_acc=jnp.where(live, out.n_acc, st.n_acc),
            seen=st.seen | live,
        )
