"""SpecTr (Sun et al. 2023): ``k`` i.i.d. draft chains verified by k-sequential selection.

The chains hang from the root of one tree, laid out depth-major (node ``d * k + j``), and
``tokax.decode.tree.SpecTrVerifier`` selects among them with the optimal-transport
acceptance rule, which keeps sampling exact. In greedy mode the chains start from the
draft's top-k first tokens and continue greedily.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tokax.decode.proposers.base import Context
from tokax.decode.proposers.draft_tree import DraftTreeBase, DraftTreeState, draft_catch_up, draft_tree_logits, \
    is_greedy
from tokax.decode.sampling import SamplingParams, process_logits
from tokax.decode.tree import SpecTrVerifier, Tree
from tokax.model.config import ModelConfig




@dataclasses.dataclass(frozen=True)
class SpecTrProposer(DraftTreeBase):
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
