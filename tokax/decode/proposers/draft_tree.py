"""Draft-model token trees: a fixed template filled from a draft (SpecInfer-style), and what
every draft-model tree proposer shares.

* Templates: a static tree as ``parents`` in BFS order, siblings by rank
  (``template_from_branching((3, 2))``: 3 children of the root, 2 below each).
* ``DraftTreeProposer``: node i is the ``rank_i``-th child of its parent under the draft (top-k
  in greedy mode; sampling without replacement, Gumbel top-k, otherwise). Children drawn by
  sampling carry in ``Tree.q_probs`` the distribution they were drawn from given their earlier
  siblings, which is what recursive rejection (``tokax.decode.tree.TreeVerifier``) needs to
  stay exact.
* The draft's own ``Stream``: its cache holds every accepted token (a catch-up pass feeds the
  previous round's path and next token) and is never written by tree nodes; draft passes over
  a partial tree read it with the tree mask (``draft_tree_logits``).

DySpec (``dyspec``) and SpecTr (``spectr``) build on the same draft helpers; Token Recycling
(``token_recycling``) on the templates.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from tokax.decode.proposers.base import Context, TreeProposer
from tokax.decode.proposers.draft_model import check_vocab
from tokax.decode.sampling import SamplingParams, process_logits
from tokax.decode.tree import Tree, ancestor_mask, tree_depth
from tokax.model import kv_cache as kvc
from tokax.model.config import ModelConfig
from tokax.model.stream import Stream


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


class TemplateShape:
    """``n_nodes`` and ``max_depth`` of a proposer with a static template (field ``parents``)."""

    @property
    def n_nodes(self) -> int:
        return len(self.parents)

    @property
    def max_depth(self) -> int:
        return max(template_depths(self.parents))


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
    draft = Stream.empty(cfg, dparams, prompt.shape[0], cache_len).prefill(prompt, prompt_len - 1)
    return DraftTreeState(cache=draft.cache, n_cached=(prompt_len - 1).astype(jnp.int32))


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
    _, hidden, draft = Stream(cfg, dparams, st.cache).extend(toks, pos, logits=False)
    h = jnp.take_along_axis(hidden, jnp.maximum(c - 1, 0)[:, None, None], axis=1)[:, 0]  # [B, D]
    draft = draft.rollback(start + c)  # drop the padding slots
    n_cached = jnp.where(ctx.live, ctx.seq_len, st.n_cached)
    return draft.logits(h), DraftTreeState(cache=draft.cache, n_cached=n_cached)


def draft_tree_logits(cfg: ModelConfig, dparams, cache: kvc.KVCache, tokens, parents, valid, root_pos) -> jax.Array:
    """Draft logits at every valid node of a (partial) tree ``[B, N, V]``; the cache is
    only read (the nodes' K/V are not kept, so nothing is written or copied)."""
    depth = tree_depth(parents)
    pos = jnp.where(valid, root_pos[:, None] + depth, -1)
    logits, _, _ = Stream(cfg, dparams, cache).score(tokens, pos, ancestor_mask(parents))
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


class DraftTreeBase(TreeProposer):
    """Shared by the draft-model tree proposers (fields ``cfg``, ``n_nodes``, ``max_depth``)."""

    def check(self, target_cfg: ModelConfig) -> None:
        check_vocab(self.cfg, target_cfg)

    def context_limit(self) -> int:
        return self.cfg.max_seq_len

    @property
    def extra_slots(self) -> int:
        # The draft cache also holds a catch-up block of max_depth + 1 slots.
        return self.max_depth + 1

    def init(self, tparams, pparams, prompt, prompt_len, cache_len: int) -> DraftTreeState:
        return draft_init(self.cfg, pparams, prompt, prompt_len, cache_len + self.extra_slots)


# ----------------------------------------------------------------------------
# Fixed template.


@dataclasses.dataclass(frozen=True)
class DraftTreeProposer(TemplateShape, DraftTreeBase):
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
