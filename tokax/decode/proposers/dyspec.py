"""DySpec (Xiong et al. 2024): a draft tree grown at run time under a node budget.

The tree grows greedily, adding the frontier candidates with the highest draft path
probability ``prod q(x_j | x_<j)`` (the proxy for acceptance) until the static node budget
is spent; ``rounds`` draft passes, each adding a batch of nodes. Verified by recursive
rejection (exact when sampling) or the greedy longest path.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tokax.decode.proposers.base import Context
from tokax.decode.proposers.draft_tree import DraftTreeBase, DraftTreeState, draft_catch_up, draft_tree_logits, \
    is_greedy, ranked_children
from tokax.decode.sampling import SamplingParams
from tokax.decode.tree import Tree
from tokax.model.config import ModelConfig




@dataclasses.dataclass(frozen=True)
class DySpecProposer(DraftTreeBase):
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
