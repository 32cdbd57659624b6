"""Tree proposers for ``tokax.decode.tree_speculative``.

A tree proposer is a frozen (hashable) dataclass with static ``n_nodes``
(``N``) and ``max_depth`` (``D``) and pure functions over an explicit state:

* ``init(tparams, pparams, prompt, prompt_len, cache_len) -> pstate``
* ``propose(tparams, pparams, pstate, ctx, sp, rng) -> (Tree, pstate)``
* ``verifier() -> callable``: the default tree verifier (hashable)
* ``check(target_cfg)``; optional ``observe(pstate, block_tokens [B, 1+N],
  p_logits [B, 1+N, V], scored [B, 1+N]) -> pstate`` sees every verify pass.

Methods:

* ``DraftTreeProposer``: a fixed tree template filled from a draft model;
  node i is the ``rank_i``-th child of its parent under the draft (top-k in
  greedy mode; sampling without replacement, Gumbel top-k, otherwise).
* ``DySpecProposer`` (DySpec; Xiong et al. 2024): the tree grows at run time,
  greedily adding the frontier candidates with the highest draft path
  probability ``prod q(x_j | x_<j)`` (the proxy for acceptance) until the
  static node budget is spent; ``rounds`` draft passes, each adding a batch.
* ``TokenRecyclingProposer`` (Token Recycling; Luo et al. 2024): no draft
  model; an adjacency table ``[V, k]`` per row holds the target's top-k next
  tokens seen so far after each token, refreshed from every verify pass, and
  the tree is read from it along a static template (BFS from ``last``).
* ``SpecTrProposer`` (SpecTr; Sun et al. 2023): ``k`` i.i.d. draft chains of
  ``length`` tokens (a root with ``k`` chains), verified by k-sequential
  selection.

Children drawn by sampling carry in ``Tree.q_probs`` the distribution they
were drawn from given their earlier siblings, which is what recursive
rejection needs to stay exact. Draft passes over a partial tree use the
tree mask (``block_mask``) over the draft cache, which holds every accepted
token (catch-up pass) and is never written by tree nodes (their cache is
discarded).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from tokax.decode.proposers import Context
from tokax.decode.proposers.draft_model import check_vocab, draft_forward, draft_unembed
from tokax.decode.sampling import SamplingParams, process_logits
from tokax.decode.tree import SpecTrVerifier, Tree, TreeVerifier, ancestor_mask, tree_depth
from tokax.model import kv_cache as kvc
from tokax.model.config import ModelConfig


# ----------------------------------------------------------------------------
# Templates.


def template_from_branching(branching: tuple[int, ...]) -> tuple[int, ...]:
    """Parents of a BFS-ordered tree where every node at depth d has
    ``branching[d]`` children (the root is depth 0): ``(3, 2)`` gives 3 + 6 nodes."""
    if not branching or any(b < 1 for b in branching):
        raise ValueError(f"branching={branching} must be a non-empty tuple of positive ints")
    parents: list[int] = []
    level = [-1]
    for b in branching:
        nxt = []
        for p in level:
            for _ in range(b):
                nxt.append(len(parents))
                parents.append(p)
        level = nxt
    return tuple(parents)


def check_template(parents: tuple[int, ...]) -> None:
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError(f"tree template parents[{i}]={p}: a parent must be -1 (root) or an earlier node")


def template_depths(parents: tuple[int, ...]) -> tuple[int, ...]:
    d: list[int] = []
    for p in parents:
        d.append(1 if p < 0 else d[p] + 1)
    return tuple(d)


def template_ranks(parents: tuple[int, ...]) -> tuple[int, ...]:
    """Sibling rank of each node (0 for the first child of its parent)."""
    seen: dict[int, int] = {}
    out = []
    for p in parents:
        out.append(seen.get(p, 0))
        seen[p] = seen.get(p, 0) + 1
    return tuple(out)


# ----------------------------------------------------------------------------
# Draft-model helpers.


@struct.dataclass
class DraftTreeState:
    cache: kvc.KVCache  # the draft's cache: seq[:n_cached] of each row
    n_cached: jax.Array  # [B]


def draft_init(cfg: ModelConfig, dparams, prompt: jax.Array, prompt_len: jax.Array, cache_len: int) -> DraftTreeState:
    """Prefill the draft cache with every prompt token but the newest."""
    B, P = prompt.shape
    cache = kvc.init_cache(cfg, B, cache_len)
    ar = jnp.arange(P, dtype=jnp.int32)[None, :]
    positions = jnp.where(ar < (prompt_len - 1)[:, None], ar, -1)
    _, _, cache = draft_forward(cfg, dparams, prompt, positions, cache, return_logits=False)
    return DraftTreeState(cache=cache, n_cached=(prompt_len - 1).astype(jnp.int32))


def draft_catch_up(cfg: ModelConfig, dparams, st: DraftTreeState, ctx: Context, width: int):
    """Feed the accepted tokens the draft has not seen (at most ``width``: the
    previous round's path and next token, ending with ``last``); returns the
    draft logits after ``last`` ``[B, V]`` and the new state."""
    S = ctx.seq.shape[1]
    c = jnp.where(ctx.live, ctx.seq_len - st.n_cached, 0)  # [B] tokens to feed
    j = jnp.arange(width, dtype=jnp.int32)[None, :]
    idx = st.n_cached[:, None] + j
    toks = jnp.take_along_axis(ctx.seq, jnp.clip(idx, 0, S - 1), axis=1)
    pos = jnp.where(j < c[:, None], idx, -1)
    start = st.cache.length
    _, hidden, cache = draft_forward(cfg, dparams, toks, pos, st.cache, return_logits=False)
    h = jnp.take_along_axis(hidden, jnp.maximum(c - 1, 0)[:, None, None], axis=1)[:, 0]  # [B, D]
    cache = kvc.rollback(cache, start + c)  # drop the padding slots
    n_cached = jnp.where(ctx.live, ctx.seq_len, st.n_cached)
    return draft_unembed(cfg, dparams, h), DraftTreeState(cache=cache, n_cached=n_cached)


def draft_tree_logits(cfg: ModelConfig, dparams, cache: kvc.KVCache, tokens, parents, valid, root_pos) -> jax.Array:
    """Draft logits at every valid node of a (partial) tree ``[B, N, V]``; the cache is
    only read (the nodes' K/V are not kept, so nothing is written or copied)."""
    depth = tree_depth(parents)
    pos = jnp.where(valid, root_pos[:, None] + depth, -1)
    logits, _, _ = draft_forward(cfg, dparams, tokens, pos, cache, block_mask=ancestor_mask(parents),
                                 write_cache=False)
    return logits


def is_greedy(sp: SamplingParams) -> jax.Array:
    return sp.temperature <= 0.0


def ranked_children(logits: jax.Array, sp: SamplingParams, rng: jax.Array, n: int):
    """The first ``n`` children of a node under the draft ``logits [..., V]``:
    top-n in greedy mode, else ``n`` draws without replacement from the
    processed ``q`` (Gumbel top-n). Returns tokens ``[..., n]``, their ``q``
    given the earlier siblings ``[..., n, V]`` (q with the earlier ones
    removed, renormalized), whether each has positive probability
    ``[..., n]``, and the processed ``q [..., V]`` itself."""
    V = logits.shape[-1]

    def greedy(_):
        # Top-n of the raw logits; the greedy verifier never reads the siblings' q, so it stays
        # zero and the sampling-only work (top-p sort, Gumbel noise, [n, V] residuals) is skipped.
        q = jax.nn.softmax(logits, -1)
        _, toks = jax.lax.top_k(logits, n)
        return toks.astype(jnp.int32), jnp.zeros((*logits.shape[:-1], n, V), q.dtype), \
            jnp.ones(toks.shape, bool), q

    def sampled(_):
        q = jax.nn.softmax(process_logits(logits, sp), -1)
        g = jax.random.gumbel(rng, logits.shape)
        _, toks = jax.lax.top_k(jnp.where(q > 0, jnp.log(q) + g, -jnp.inf), n)  # [..., n]
        toks = toks.astype(jnp.int32)
        oh = jax.nn.one_hot(toks, V, dtype=q.dtype)  # [..., n, V]
        before = jnp.cumsum(oh, axis=-2) - oh  # tokens of earlier siblings
        qn = q[..., None, :] * (1.0 - before)
        mass = qn.sum(-1, keepdims=True)
        qn = qn / jnp.where(mass > 0, mass, 1.0)
        return toks, qn, jnp.take_along_axis(q, toks, axis=-1) > 0, q

    return jax.lax.cond(is_greedy(sp), greedy, sampled, None)


class _DraftBase:
    """Shared by the draft-model tree proposers (fields ``cfg``, ``n_nodes``, ``max_depth``)."""

    def check(self, target_cfg: ModelConfig) -> None:
        check_vocab(self.cfg, target_cfg)

    @property
    def extra_slots(self) -> int:
        # The draft cache also holds a catch-up block of max_depth + 1 slots.
        return self.max_depth + 1

    def init(self, tparams, pparams, prompt, prompt_len, cache_len: int) -> DraftTreeState:
        return draft_init(self.cfg, pparams, prompt, prompt_len, cache_len + self.extra_slots)

    def verifier(self):
        return TreeVerifier()


# ----------------------------------------------------------------------------
# Fixed template.


@dataclasses.dataclass(frozen=True)
class DraftTreeProposer(_DraftBase):
    """A static tree template (``parents``; BFS order, siblings by rank) whose
    nodes are the draft's ranked children of their parents. One catch-up pass
    plus ``max_depth - 1`` draft passes over the tree per round."""

    cfg: ModelConfig
    parents: tuple[int, ...] = template_from_branching((3, 2, 1))

    def __post_init__(self):
        check_template(self.parents)

    @classmethod
    def from_branching(cls, cfg: ModelConfig, branching: tuple[int, ...]) -> "DraftTreeProposer":
        return cls(cfg=cfg, parents=template_from_branching(tuple(branching)))

    @property
    def n_nodes(self) -> int:
        return len(self.parents)

    @property
    def max_depth(self) -> int:
        return max(template_depths(self.parents))

    def propose(self, tparams, pparams, st: DraftTreeState, ctx: Context, sp: SamplingParams, rng):
        cfg, N = self.cfg, self.n_nodes
        B = ctx.seq.shape[0]
        V = cfg.vocab_size
        depths, ranks = template_depths(self.parents), template_ranks(self.parents)
        root_logits, st = draft_catch_up(cfg, pparams, st, ctx, self.max_depth + 1)
        parents = jnp.broadcast_to(jnp.asarray(self.parents, jnp.int32), (B, N))
        tokens = jnp.zeros((B, N), jnp.int32)
        valid = jnp.zeros((B, N), bool)
        q_probs = jnp.zeros((B, N, V), jnp.float32)
        slot_logits = jnp.zeros((B, 1 + N, V), jnp.float32).at[:, 0].set(root_logits)  # slot 0 = root
        keys = jax.random.split(rng, self.max_depth)
        for d in range(1, self.max_depth + 1):
            nodes = [i for i in range(N) if depths[i] == d]
            par_slots = sorted({self.parents[i] + 1 for i in nodes})
            n_max = max(ranks[i] for i in nodes) + 1
            toks, qn, ok, _ = ranked_children(slot_logits[:, np.array(par_slots)], sp, keys[d - 1], n_max)
            for i in nodes:
                a = par_slots.index(self.parents[i] + 1)
                par_ok = ctx.live if self.parents[i] < 0 else valid[:, self.parents[i]]
                tokens = tokens.at[:, i].set(toks[:, a, ranks[i]])
                valid = valid.at[:, i].set(par_ok & ok[:, a, ranks[i]])
                q_probs = q_probs.at[:, i].set(qn[:, a, ranks[i]])
            if d < self.max_depth:
                lg = draft_tree_logits(cfg, pparams, st.cache, tokens, parents, valid, ctx.seq_len - 1)
                sel = np.array(nodes)
                slot_logits = slot_logits.at[:, 1 + sel].set(lg[:, sel])
        return Tree(tokens=tokens, parents=parents, valid=valid, q_probs=q_probs), st


# ----------------------------------------------------------------------------
# DySpec.


@dataclasses.dataclass(frozen=True)
class DySpecProposer(_DraftBase):
    """Dynamic tree (DySpec): best-first growth by draft path probability.

    A candidate is (node s, its next child by rank r) with score
    ``P(path to s) * q_s(r-th child)`` (greedy; when sampling, the expected
    ``q`` of the r-th draw given the earlier siblings, so that a child's
    presence never depends on its own value, which keeps recursive rejection
    exact); ``rounds`` times, the best
    ``n_nodes / rounds`` candidates become nodes (a node's children only
    become candidates after the draft pass that computes its ``q``), so the
    tree takes the shape the draft's confidence gives it: deep where it is
    sure, wide where it hesitates. Scores are made non-increasing in r
    (running minimum) so that siblings are always added in draw order."""

    cfg: ModelConfig
    n_nodes: int = 12
    rounds: int = 4
    max_children: int = 4  # ranks considered per node

    def __post_init__(self):
        if not 1 <= self.rounds <= self.n_nodes:
            raise ValueError(f"rounds={self.rounds} must be in [1, n_nodes={self.n_nodes}]")
        if self.max_children < 1:
            raise ValueError(f"max_children={self.max_children} must be >= 1")

    @property
    def max_depth(self) -> int:
        return self.rounds  # every round adds at most one level

    def _per_round(self) -> list[int]:
        base, extra = divmod(self.n_nodes, self.rounds)
        return [base + (1 if r < extra else 0) for r in range(self.rounds)]

    def propose(self, tparams, pparams, st: DraftTreeState, ctx: Context, sp: SamplingParams, rng):
        cfg, N, Kc = self.cfg, self.n_nodes, self.max_children
        B = ctx.seq.shape[0]
        V = cfg.vocab_size
        root_logits, st = draft_catch_up(cfg, pparams, st, ctx, self.max_depth + 1)
        keys = jax.random.split(rng, self.rounds)

        greedy = is_greedy(sp)

        def rank_slots(logits, key):  # [B, M, V] -> per-slot ranked children
            toks, qn, ok, q = ranked_children(logits, sp, key, Kc)
            qx = jnp.take_along_axis(q, toks, axis=-1)  # [B, M, Kc]
            # Sampling: whether the r-th child joins the tree must not depend on
            # its own value (that would bias it away from q_r), so its score is
            # the expected q of a draw from q_r, a function of earlier siblings.
            expected = jnp.einsum("bmrv,bmv->bmr", qn, q)
            score = jnp.where(greedy, qx, expected)
            score = jax.lax.cummin(jnp.where(ok, score, 0.0), axis=qx.ndim - 1)
            score = score * (1.0 - 1e-6) ** jnp.arange(Kc, dtype=jnp.float32)  # strict order by rank
            return toks, qn, jnp.where(ok, score, 0.0)

        # Per slot (0 = root, 1 + i = node i): its ranked children, their q, their scores.
        r_tok, r_q, r_sc = rank_slots(root_logits[:, None], keys[0])
        slot_tok = jnp.zeros((B, 1 + N, Kc), jnp.int32).at[:, :1].set(r_tok)
        slot_q = jnp.zeros((B, 1 + N, Kc, V), jnp.float32).at[:, :1].set(r_q)
        slot_sc = jnp.zeros((B, 1 + N, Kc), jnp.float32).at[:, :1].set(r_sc)
        path_p = jnp.zeros((B, 1 + N), jnp.float32).at[:, 0].set(jnp.where(ctx.live, 1.0, 0.0))
        n_child = jnp.zeros((B, 1 + N), jnp.int32)
        tokens = jnp.zeros((B, N), jnp.int32)
        parents = jnp.full((B, N), -1, jnp.int32)
        valid = jnp.zeros((B, N), bool)
        q_probs = jnp.zeros((B, N, V), jnp.float32)
        n_done = 0
        bidx = jnp.arange(B)[:, None]
        for r, m in enumerate(self._per_round()):
            rank = jnp.arange(Kc)[None, None, :]
            avail = rank >= n_child[:, :, None]
            cand = jnp.where(avail, path_p[:, :, None] * slot_sc, -1.0).reshape(B, -1)  # [B, (1+N)*Kc]
            best, flat = jax.lax.top_k(cand, m)
            ok = best > 0
            flat = jnp.where(ok, flat, (1 + N) * Kc)  # invalid picks sort last
            order = jnp.argsort(flat, axis=1)  # node index order = (slot, rank) order: siblings by rank
            flat, ok, best = (jnp.take_along_axis(x, order, axis=1) for x in (flat, ok, best))
            flat = jnp.minimum(flat, (1 + N) * Kc - 1)
            s, rk = flat // Kc, flat % Kc  # [B, m]
            new = np.arange(n_done, n_done + m)
            tokens = tokens.at[:, new].set(slot_tok[bidx, s, rk])
            parents = parents.at[:, new].set(jnp.where(ok, s - 1, -1))
            valid = valid.at[:, new].set(ok)
            q_probs = q_probs.at[:, new].set(slot_q[bidx, s, rk])
            path_p = path_p.at[:, 1 + new].set(jnp.where(ok, best, 0.0))
            n_child = n_child.at[bidx, s].add(ok.astype(jnp.int32))
            n_done += m
            if r + 1 < self.rounds:
                lg = draft_tree_logits(cfg, pparams, st.cache, tokens, parents, valid, ctx.seq_len - 1)
                t2, q2, sc2 = rank_slots(lg[:, new], keys[r + 1])
                slot_tok = slot_tok.at[:, 1 + new].set(t2)
                slot_q = slot_q.at[:, 1 + new].set(q2)
                slot_sc = slot_sc.at[:, 1 + new].set(sc2)
        return Tree(tokens=tokens, parents=parents, valid=valid, q_probs=q_probs), st


# ----------------------------------------------------------------------------
# Token Recycling.


@struct.dataclass
class RecyclingState:
    table: jax.Array  # [B, V, k] int32 candidate next tokens after each token, -1 = none yet


@dataclasses.dataclass(frozen=True)
class TokenRecyclingProposer:
    """Training-free tree from an adjacency table of the target's past top-k
    (Token Recycling). ``parents`` is the static template; node i is
    ``table[token(parent_i), rank_i]``. Deterministic drafts (q one-hot)."""

    vocab_size: int
    k: int = 4
    parents: tuple[int, ...] = template_from_branching((4, 2, 1))

    def __post_init__(self):
        check_template(self.parents)
        if max(template_ranks(self.parents)) >= self.k:
            need = max(template_ranks(self.parents)) + 1
            raise ValueError(f"the template needs {need} candidates per token but the table has k={self.k}")

    @property
    def n_nodes(self) -> int:
        return len(self.parents)

    @property
    def max_depth(self) -> int:
        return max(template_depths(self.parents))

    def check(self, target_cfg: ModelConfig) -> None:
        if self.vocab_size != target_cfg.vocab_size:
            raise ValueError(f"TokenRecyclingProposer vocab_size={self.vocab_size} differs from the target's "
                             f"vocab_size={target_cfg.vocab_size}")

    def verifier(self):
        return TreeVerifier()

    def init(self, tparams, pparams, prompt, prompt_len, cache_len: int) -> RecyclingState:
        B = prompt.shape[0]
        return RecyclingState(table=jnp.full((B, self.vocab_size, self.k), -1, jnp.int32))

    def propose(self, tparams, pparams, st: RecyclingState, ctx: Context, sp, rng):
        B, N = ctx.seq.shape[0], self.n_nodes
        last = jnp.take_along_axis(ctx.seq, (ctx.seq_len - 1)[:, None], axis=1)[:, 0]
        ranks = template_ranks(self.parents)
        toks, ok = [], []
        for i, p in enumerate(self.parents):
            par_tok = last if p < 0 else toks[p]
            par_ok = ctx.live if p < 0 else ok[p]
            t = st.table[jnp.arange(B), jnp.maximum(par_tok, 0), ranks[i]]
            toks.append(jnp.maximum(t, 0))
            ok.append(par_ok & (t >= 0))
        parents = jnp.broadcast_to(jnp.asarray(self.parents, jnp.int32), (B, N))
        return Tree(tokens=jnp.stack(toks, 1), parents=parents, valid=jnp.stack(ok, 1)), st

    def observe(self, st: RecyclingState, block_tokens, p_logits, scored) -> RecyclingState:
        """table[x] <- top-k of the target's logits after every scored token x."""
        _, top = jax.lax.top_k(p_logits, self.k)  # [B, 1+N, k]
        idx = jnp.where(scored, block_tokens, self.vocab_size)  # out of range: dropped

        def one(tab, i, t):
            return tab.at[i].set(t.astype(jnp.int32), mode="drop")

        return RecyclingState(table=jax.vmap(one)(st.table, idx, top))


# ----------------------------------------------------------------------------
# SpecTr.


@dataclasses.dataclass(frozen=True)
class SpecTrProposer(_DraftBase):
    """``k`` i.i.d. draft chains of ``length`` tokens from the draft model
    (SpecTr), laid out depth-major (node ``d * k + j``). In greedy mode the
    chains start from the draft's top-k first tokens and continue greedily."""

    cfg: ModelConfig
    k: int = 3
    length: int = 3

    def __post_init__(self):
        if self.k < 1 or self.length < 1:
            raise ValueError(f"SpecTr k={self.k} and length={self.length} must be >= 1")

    @property
    def n_nodes(self) -> int:
        return self.k * self.length

    @property
    def max_depth(self) -> int:
        return self.length

    def verifier(self):
        return SpecTrVerifier(self.k, self.length)

    def propose(self, tparams, pparams, st: DraftTreeState, ctx: Context, sp: SamplingParams, rng):
        cfg, k, L, N = self.cfg, self.k, self.length, self.n_nodes
        B = ctx.seq.shape[0]
        V = cfg.vocab_size
        greedy = is_greedy(sp)
        root_logits, st = draft_catch_up(cfg, pparams, st, ctx, L + 1)
        par = [-1] * k + [(d - 1) * k + j for d in range(1, L) for j in range(k)]
        parents = jnp.broadcast_to(jnp.asarray(par, jnp.int32), (B, N))
        tokens = jnp.zeros((B, N), jnp.int32)
        valid = jnp.zeros((B, N), bool)
        q_probs = jnp.zeros((B, N, V), jnp.float32)
        keys = jax.random.split(rng, L)
        logits = jnp.broadcast_to(root_logits[:, None], (B, k, V))  # each chain's next-token draft logits
        alive = jnp.broadcast_to(ctx.live[:, None], (B, k))
        for d in range(L):
            q = jnp.where(greedy, jax.nn.softmax(logits, -1), jax.nn.softmax(process_logits(logits, sp), -1))
            drawn = jax.random.categorical(keys[d], jnp.log(q), axis=-1).astype(jnp.int32)  # i.i.d. per chain
            if d == 0:
                first = jax.lax.top_k(root_logits, k)[1].astype(jnp.int32)  # distinct starts when greedy
                best = jnp.where(greedy, first, drawn)
            else:
                best = jnp.where(greedy, jnp.argmax(logits, -1).astype(jnp.int32), drawn)
            sl = slice(d * k, (d + 1) * k)
            tokens = tokens.at[:, sl].set(best)
            valid = valid.at[:, sl].set(alive)
            q_probs = q_probs.at[:, sl].set(q)
            if d + 1 < L:
                lg = draft_tree_logits(cfg, pparams, st.cache, tokens, parents, valid, ctx.seq_len - 1)
                logits = lg[:, sl]
        return Tree(tokens=tokens, parents=parents, valid=valid, q_probs=q_probs), st



# ----------------------------------------------------------------------------
# Factory (what a job calls with a config's fields).

# ----------------------------------------------------------------------------
# Medusa: the cartesian top-k tree of blockwise heads on the target's own hidden state.


@struct.dataclass
class MedusaState:
    hidden: jax.Array  # [B, D] target hidden state after the newest accepted token
    ready: jax.Array  # [B] bool: hidden is set (false before the first verify pass)


@dataclasses.dataclass(frozen=True)
class MedusaTreeProposer:
    """Medusa-style tree (Cai et al. 2024) from the blockwise heads
    (``tokax.decode.proposers.blockwise``, ``pparams`` = trained heads): node
    ``(c_1..c_d)`` is the ``c_d``-th best token of head ``d``
    (``head_topk_tree``). The heads read the target's hidden state at the
    newest accepted token, which the tree loop hands over after each verify
    pass (``observe_tree_hidden``), so drafting costs no extra target pass;
    the first round has no state and sends an empty tree. The nodes are
    deterministic given that state (q one-hot on each node), so the greedy
    and recursive-rejection verifiers keep the target's distribution."""

    topk: tuple[int, ...] = (3, 2, 1)

    def __post_init__(self):
        from tokax.decode.proposers.blockwise import tree_structure

        tree_structure(tuple(self.topk))  # validates topk

    @property
    def n_nodes(self) -> int:
        from tokax.decode.proposers.blockwise import tree_structure

        return len(tree_structure(tuple(self.topk))[0])

    @property
    def max_depth(self) -> int:
        return len(self.topk)

    def check(self, target_cfg: ModelConfig) -> None:
        pass  # the heads use the target's own embedding

    def verifier(self):
        return TreeVerifier()

    def init(self, tparams, pparams, prompt, prompt_len, cache_len: int) -> MedusaState:
        if pparams is None or pparams["w"].shape[0] < len(self.topk):
            have = None if pparams is None else pparams["w"].shape[0]
            raise ValueError(f"medusa topk={self.topk} needs {len(self.topk)} heads, got {have}")
        B, D = prompt.shape[0], tparams["embed"].shape[1]
        return MedusaState(hidden=jnp.zeros((B, D), jnp.float32), ready=jnp.zeros((B,), bool))

    def propose(self, tparams, pparams, st: MedusaState, ctx: Context, sp, rng):
        from tokax.decode.proposers.blockwise import head_topk_tree

        ht = head_topk_tree(pparams, tparams["embed"], st.hidden, tuple(self.topk))
        B, N = ht.tokens.shape
        parents = jnp.broadcast_to(jnp.asarray(ht.parents, jnp.int32), (B, N))
        valid = jnp.broadcast_to((st.ready & ctx.live)[:, None], (B, N))
        return Tree(tokens=ht.tokens, parents=parents, valid=valid), st

    def observe_tree_hidden(self, st: MedusaState, hidden: jax.Array, live: jax.Array) -> MedusaState:
        return MedusaState(hidden=jnp.where(live[:, None], hidden.astype(jnp.float32), st.hidden),
                           ready=st.ready | live)


TREE_METHODS = ("tree", "dyspec", "token_recycling", "spectr", "medusa")


def make_tree_proposer(method: str, target_cfg: ModelConfig, target_params: Any, *, draft: str = "truncated",
                       draft_layers: int = 4,
                       branching: tuple[int, ...] = (3, 2, 1), n_nodes: int = 12, rounds: int = 4,
                       max_children: int = 4, table_k: int = 4, spectr_k: int = 3,
                       spectr_length: int = 4, medusa_topk: tuple[int, ...] = (3, 2, 1),
                       medusa_heads: Any = None) -> tuple[Any, Any]:
    """(proposer, its params) for ``method`` on a target. Draft-model methods
    use ``draft`` (``tokax.decode.proposers.distilled.make_draft``: the
    shipped distilled Gemma draft, or the target's first ``draft_layers``
    layers as an untrained baseline)."""
    from tokax.decode.proposers.distilled import make_draft

    if method not in TREE_METHODS:
        raise ValueError(f"method={method!r}: use one of {', '.join(TREE_METHODS)}")
    branching = tuple(int(b) for b in branching)
    if method == "medusa":
        if medusa_heads is None:
            raise ValueError("method='medusa' needs trained heads (medusa_heads; experiments/train_gemma_heads.py)")
        return MedusaTreeProposer(topk=tuple(int(t) for t in medusa_topk)), medusa_heads
    if method == "token_recycling":
        return TokenRecyclingProposer(target_cfg.vocab_size, k=table_k,
                                      parents=template_from_branching(branching)), None
    dcfg, dparams = make_draft(target_cfg, target_params, draft, draft_layers)
    if method == "tree":
        return DraftTreeProposer.from_branching(dcfg, branching), dparams
    if method == "dyspec":
        return DySpecProposer(dcfg, n_nodes=n_nodes, rounds=rounds, max_children=max_children), dparams
    return SpecTrProposer(dcfg, k=spectr_k, length=spectr_length), dparams
