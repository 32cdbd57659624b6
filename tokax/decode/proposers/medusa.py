"""Medusa (Cai et al. 2024): the cartesian top-k tree of blockwise heads on the target's own state.

The heads are those of blockwise parallel decoding (``tokax.decode.proposers.blockwise``,
trained by ``tokax.train.heads``); they read the target's hidden state at the newest
accepted token, which the tree loop hands over after each verify pass (``observe``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from tokax.decode.proposers.base import Context, TreeProposer
from tokax.decode.tree import Tree




@struct.dataclass
class MedusaState:
    hidden: jax.Array  # [B, D] target hidden state after the newest accepted token
    ready: jax.Array  # [B] bool: hidden is set (false before the first verify pass)


@dataclasses.dataclass(frozen=True)
class MedusaTreeProposer(TreeProposer):
    """Medusa-style tree (Cai et al. 2024) from the blockwise heads
    (``tokax.decode.proposers.blockwise``, ``pparams`` = trained heads): node
    ``(c_1..c_d)`` is the ``c_d``-th best token of head ``d``
    (``head_topk_tree``). The heads read the target's hidden state at the
    newest accepted token, which the tree loop hands over after each verify
    pass (``observe``), so drafting costs no extra target pass;
    the first round has no state and sends an empty tree. The nodes are
    deterministic given that state (q one-hot on each node), so the greedy
    and recursive-rejection verifiers keep the target's distribution."""

    topk: tuple[int, ...] = (3, 2, 1)
    reads_target_hidden = True  # class constant, not a field

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

    def observe(self, st: MedusaState, out) -> MedusaState:
        live = out.live
        return MedusaState(hidden=jnp.where(live[:, None], out.last_hidden.astype(jnp.float32), st.hidden),
                           ready=st.ready | live)
