"""Blockwise parallel decoding (Stern et al. 2018) with Medusa-style heads.

``k`` extra heads read the frozen target's final-normed hidden state ``h_t``
(the state after token ``t``, from which the target itself predicts token
``t+1``) and each predicts one token further ahead:

    head i (i = 1..k):  f_i = h_t + SiLU(W_i h_t + b_i)          # [D]
                        q_i(. | x_{<=t}) = softmax(E f_i)          # token t+1+i

with ``E`` the target's tied embedding (its LM head). This is Medusa-1's head
(one residual SiLU block, LM head shared instead of copied); Stern et al.
use one hidden layer per head on the decoder output, same role. With
``W_i = 0, b_i = 0`` (``init_heads``) every head starts as the target's own
next-token distribution, so training starts from "repeat the base
prediction" and only has to learn the shift.

Decoding (the paper's predict / verify / accept, merged as in its Sec. 3:
"the verify pass also proposes the next block"): the chain loop
(``tokax.decode.speculative``) verifies ``[last, x_1..x_k]`` in one target
pass; ``observe`` keeps ``h`` at the newest accepted token, whose
target prediction is the token the verifier just emitted (``t+1``), and
the heads turn it into the next block's drafts ``x_1..x_k`` for positions
``t+2..t+1+k`` with no extra target pass. The first round has no hidden
state yet and proposes nothing (the loop runs a one-token pass, which
still feeds the hook).

Drafts are ``argmax q_i`` at temperature 0 (the paper's greedy blockwise
decoding: accept the longest prefix on which the base model's argmax
agrees), and, with ``sample_drafts=True``, draws ``x_i ~ q_i`` at
temperature > 0 with ``q_logits`` returned so speculative sampling keeps the
target's exact distribution; with ``sample_drafts=False`` they are argmax
drafts treated as deterministic (q one-hot), also exact.

The heads' formula and init live in ``tokax.model.heads`` (shared with training).
``head_topk_tree`` expands the heads into Medusa's static token tree (the
cartesian product of each head's top-``k_i`` tokens) for tree verification.
Training (frozen target): ``tokax.train.heads``.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from tokax.decode.proposers.base import ChainProposer, Context, Proposal
from tokax.decode.sampling import SamplingParams, sample
from tokax.model.heads import NEG_LOGIT, apply_heads, init_heads  # noqa: F401  (the formula; re-exported here)

Params = Any


def head_logits(hparams: Params, embed: jax.Array, hidden: jax.Array) -> jax.Array:
    """Draft logits of every head: ``hidden [..., D]`` -> ``[..., k, V]`` float32,
    head ``i`` (0-based) predicting the token ``i + 2`` positions after the
    token that produced ``hidden``. Heads trained over a token subset
    (``hparams["head_ids"]``, ``configs/blockwise.py`` ``head_vocab``) score
    only it; the other tokens get q = 0 (exact under speculative sampling)."""
    f = apply_heads(hparams, hidden)
    if "head_ids" not in hparams:
        return jnp.einsum("...kd,vd->...kv", f.astype(embed.dtype), embed, preferred_element_type=jnp.float32)
    ids = hparams["head_ids"]
    sub = jnp.einsum("...kd,sd->...ks", f.astype(embed.dtype), jnp.take(embed, ids, axis=0),
                     preferred_element_type=jnp.float32)
    full = jnp.full((*sub.shape[:-1], embed.shape[0]), NEG_LOGIT, jnp.float32)
    return full.at[..., ids].set(sub)


def first_heads(hparams: Params, k: int) -> Params:
    """The first ``k`` heads (``w``, ``b``; a token subset is shared by all heads)."""
    return {name: (a if name == "head_ids" else a[:k]) for name, a in hparams.items()}


@struct.dataclass
class BlockwiseState:
    hidden: jax.Array  # [B, D] float32 target state after the newest accepted token
    ready: jax.Array  # [B] bool, hidden is set (False before the first target pass)


@dataclasses.dataclass(frozen=True)
class BlockwiseProposer(ChainProposer):
    """Chain proposer from ``k`` heads; ``pparams = init_heads(...)`` (or
    trained heads with at least ``k`` heads: the first ``k`` are used)."""

    k: int = 3
    sample_drafts: bool = True  # temperature > 0: draw drafts from the heads (else argmax, q one-hot)
    # The first round has no hidden state yet (an empty draft, a one-token pass); the heads read
    # the verify pass's hidden states (``observe``). Class constants, not fields.
    can_be_empty = True
    reads_target_hidden = True

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"blockwise k={self.k}: the number of heads per round must be >= 1")

    def _check_heads(self, tparams, pparams) -> None:
        if pparams is None or "w" not in pparams:
            raise ValueError("blockwise proposer needs pparams = heads from blockwise.init_heads or a trained .npz")
        kh, d, _ = pparams["w"].shape
        D = tparams["embed"].shape[1]
        if kh < self.k:
            raise ValueError(f"blockwise k={self.k} but the heads file has only {kh} heads; lower k")
        if d != D:
            raise ValueError(f"blockwise heads have d_model={d}, the target has d_model={D}")

    def init(self, tparams, pparams, prompt, prompt_len, cache_len) -> BlockwiseState:
        self._check_heads(tparams, pparams)
        B = prompt.shape[0]
        D = tparams["embed"].shape[1]
        return BlockwiseState(hidden=jnp.zeros((B, D), jnp.float32), ready=jnp.zeros((B,), bool))

    def propose(self, tparams, pparams, st: BlockwiseState, ctx: Context, sp: SamplingParams, rng):
        heads = first_heads(pparams, self.k)
        logits = head_logits(heads, tparams["embed"], st.hidden)  # [B, K, V]
        if self.sample_drafts:
            tokens = sample(rng, logits, sp)  # [B, K]: argmax at temperature 0, else x_i ~ q_i
            q = logits
        else:
            tokens, q = jnp.argmax(logits, -1).astype(jnp.int32), None
        n = jnp.where(st.ready & ctx.live, self.k, 0).astype(jnp.int32)
        return Proposal(tokens=tokens, n=n, q_logits=q), st

    def observe(self, st: BlockwiseState, out) -> BlockwiseState:
        # The target's state after the newest accepted token (block index n_acc).
        h = out.last_hidden.astype(jnp.float32)
        return BlockwiseState(hidden=jnp.where(out.live[:, None], h, st.hidden), ready=st.ready | out.live)


# ----------------------------------------------------------------------------
# Medusa-style static token tree from the heads
# ----------------------------------------------------------------------------


def tree_structure(topk: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Static shape of the cartesian top-k tree: nodes are the paths
    ``(c_1..c_d)``, ``c_i < topk[i-1]``, for depth ``d = 1..len(topk)``, in
    breadth-first order (a parent before its children; siblings by rank).
    Returns ``parents [N]`` (index of the parent node, -1 = child of the
    root, i.e. of the last accepted token), ``depth [N]`` (1-based) and
    ``rank [N]`` (``c_d``: the rank of the node's token in its head's top-k)."""
    if not topk or any(int(t) < 1 for t in topk):
        raise ValueError(f"head_topk_tree topk={topk}: need one entry >= 1 per head")
    index: dict[tuple[int, ...], int] = {}
    parents, depth, rank = [], [], []
    for d in range(1, len(topk) + 1):
        for path in itertools.product(*(range(int(t)) for t in topk[:d])):
            index[path] = len(parents)
            parents.append(index[path[:-1]] if d > 1 else -1)
            depth.append(d)
            rank.append(path[-1])
    return np.asarray(parents, np.int32), np.asarray(depth, np.int32), np.asarray(rank, np.int32)


class HeadTree(NamedTuple):
    parents: np.ndarray  # [N] static: parent node index, -1 = the root (last accepted token)
    depth: np.ndarray  # [N] static: 1..k, the head that drafted the node
    tokens: jax.Array  # [B, N] int32 draft token of each node
    head_logits: jax.Array  # [B, k, V] float32 raw draft logits of each head

    def q_logits(self) -> jax.Array:
        """Per-node draft logits ``[B, N, V]``: a node at depth d has head d's distribution."""
        return self.head_logits[:, self.depth - 1]


def head_topk_tree(hparams: Params, embed: jax.Array, hidden: jax.Array, topk: tuple[int, ...]) -> HeadTree:
    """Medusa's tree: node ``(c_1..c_d)`` carries the ``c_d``-th most likely
    token of head ``d`` (``d`` tokens ahead of the target's next token), so a
    root-to-node path is one candidate continuation; every combination of
    the heads' top-``topk[i]`` tokens is present (``sum_d prod_{i<=d}
    topk[i]`` nodes). ``hidden [B, D]`` is the target state after the last
    accepted token; uses the first ``len(topk)`` heads."""
    parents, depth, rank = tree_structure(tuple(int(t) for t in topk))
    k = len(topk)
    if hparams["w"].shape[0] < k:
        raise ValueError(f"head_topk_tree: {k} levels need {k} heads, got {hparams['w'].shape[0]}")
    heads = first_heads(hparams, k)
    logits = head_logits(heads, embed, hidden)  # [B, k, V]
    kmax = max(int(t) for t in topk)
    _, top = jax.lax.top_k(logits, kmax)  # [B, k, kmax], best first
    tokens = top[:, depth - 1, rank].astype(jnp.int32)  # [B, N]
    return HeadTree(parents=parents, depth=depth, tokens=tokens, head_logits=logits)
