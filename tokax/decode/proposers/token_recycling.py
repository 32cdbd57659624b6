"""Token Recycling (Luo et al. 2024): a training-free token tree from the target's own past top-k.

No draft model: an adjacency table ``[V, k]`` per row holds the target's top-k next tokens
seen so far after each token, refreshed from every verify pass (``observe``, which needs the
pass's float32 logits: ``needs_logits``), and the tree is read from it along a static
template (BFS from the newest token). Deterministic drafts (q one-hot), so the greedy and
recursive-rejection verifiers keep the target's distribution.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from tokax.decode.proposers.base import Context, TreeProposer
from tokax.decode.proposers.draft_tree import TemplateShape, check_template, template_from_branching, \
    template_ranks
from tokax.decode.tree import Tree
from tokax.model.config import ModelConfig




@struct.dataclass
class RecyclingState:
    table: jax.Array  # [B, V, k] int32 candidate next tokens after each token, -1 = none yet


@dataclasses.dataclass(frozen=True)
class TokenRecyclingProposer(TemplateShape, TreeProposer):
    """Training-free tree from an adjacency table of the target's past top-k
    (Token Recycling). ``parents`` is the static template; node i is
    ``table[token(parent_i), rank_i]``. Deterministic drafts (q one-hot)."""

    vocab_size: int
    k: int = 4
    parents: tuple[int, ...] = template_from_branching((4, 2, 1))
    needs_logits = True  # observe reads the verify pass's top-k (class constant, not a field)

    def __post_init__(self):
        check_template(self.parents)
        if max(template_ranks(self.parents)) >= self.k:
            need = max(template_ranks(self.parents)) + 1
            raise ValueError(f"the template needs {need} candidates per token but the table has k={self.k}")

    def check(self, target_cfg: ModelConfig) -> None:
        if self.vocab_size != target_cfg.vocab_size:
            raise ValueError(f"TokenRecyclingProposer vocab_size={self.vocab_size} differs from the target's "
                             f"vocab_size={target_cfg.vocab_size}")

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

    def observe(self, st: RecyclingState, out) -> RecyclingState:
        """table[x] <- top-k of the target's logits after every scored token x."""
        _, top = jax.lax.top_k(out.logits, self.k)  # [B, 1+N, k]
        idx = jnp.where(out.positions >= 0, out.block, self.vocab_size)  # out of range: dropped

        def one(tab, i, t):
            return tab.at[i].set(t.astype(jnp.int32), mode="drop")

        return RecyclingState(table=jax.vmap(one)(st.table, idx, top))
