"""Token-tree speculative decoding: a tree proposer drafts, the target verifies the whole
tree in one pass, in the shared decode loop (``tokax.decode.loop``).

Each round, for every live row:

1. the proposer (``tokax.decode.proposers``, ``TreeProposer``) drafts a tree of ``N`` node
   slots (``tokax.decode.tree.Tree``; static ``N``, per-row shape);
2. the target scores ``[last, node_0 .. node_{N-1}]`` in one forward pass with
   a tree ``block_mask`` (a node sees the cache, the root and its ancestors),
   node ``i`` at position ``t + depth_i`` where ``last`` sits at ``t``;
3. a tree verifier (greedy, recursive rejection, or SpecTr's k-sequential
   selection) accepts a root path of ``n_acc <= max_depth`` nodes and gives
   the next token;
4. the target cache keeps ``last`` and the accepted path (``Stream.compact``: the
   path's slots move to the front of the block), the proposer observes the verify
   pass (Token Recycling refreshes its adjacency table, Medusa's heads read the
   target's state), and the row advances by ``n_acc + 1`` tokens, cut at a stop
   token or its budget (``loop.emit``).

Lossless like ``tokax.decode.speculative``: greedy output equals plain greedy
decoding (up to float ties between differently shaped forwards); sampled
output follows the target's distribution exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax.numpy as jnp

from tokax.decode import loop
from tokax.decode.loop import SpecState, VerifyOutput, buffer_sizes, verify_block_sizes
from tokax.decode.sampling import SamplingParams
from tokax.decode.speculative import SpeculativeGenerator
from tokax.decode.tree import block_mask, block_positions, compact_to_path, greedy_tree_accept
from tokax.decode.verify import greedy_path
from tokax.model.config import ModelConfig
from tokax.model.decoder import Params
from tokax.model.screen import ArgmaxScreen


def tree_round(cfg, params, proposer, pparams, s: SpecState, sp: SamplingParams, max_new, eos_ids,
               verifier, screen: ArgmaxScreen | None = None, verify_sizes: tuple[int, ...] | None = None) -> SpecState:
    """One round: propose a tree, verify it in one target pass, keep the accepted path. With a
    ``screen``, greedy rounds of the built-in verifiers take the target's greedy tokens from it
    (``tokax.model.screen``; the same tokens, cheaper on CPU); a proposer that reads the target's
    logits (``needs_logits``: Token Recycling) always gets full logits. ``verify_sizes`` (static
    pass lengths, as in ``tokax.decode.speculative``): each round scores only the block up to its
    last valid node, padded to the smallest such length; default one pass over all ``1 + N`` slots."""
    D = proposer.max_depth
    rows = s.rows
    B = rows.seq.shape[0]
    d = loop.propose(proposer, params, pparams, s, sp)
    pstate, live = d.pstate, d.live
    tree = d.draft.replace(valid=d.draft.valid & live[:, None])

    block = jnp.concatenate([d.last, tree.tokens], axis=1)  # [B, 1+N]
    positions = block_positions(tree, rows.seq_len - 1, live)  # [B, 1+N]
    start = s.cache.length
    N = tree.tokens.shape[1]
    (n_acc, path, nxt), hidden, logits, cache = loop.verify_block(
        cfg, params, s.cache, block, positions, sp=sp, screen=screen, mode=greedy_path(verifier),
        sizes=verify_block_sizes(N, verify_sizes) if verify_sizes is not None else (1 + N,),
        # With the valid nodes first (``valid_first``), a round whose trees are small gets a short pass.
        need=jnp.max(jnp.where(tree.valid, jnp.arange(N, dtype=jnp.int32)[None, :], -1)) + 2,  # the last valid node
        greedy_fn=lambda top: greedy_tree_accept(top, tree, D),
        verified_fn=lambda lg: verifier(lg, tree, sp, d.k_verify, D),
        block_mask=block_mask(tree.parents), keep_logits=proposer.needs_logits)
    n_acc = jnp.where(live, n_acc, 0)

    # The row's new tokens: the accepted path, then the target's token.
    ar = jnp.arange(D + 1, dtype=jnp.int32)[None, :]
    path_tok = jnp.take_along_axis(tree.tokens, jnp.maximum(path, 0), axis=1)  # [B, D]
    path_tok = jnp.concatenate([path_tok, jnp.zeros((B, 1), jnp.int32)], axis=1)
    new = jnp.where(ar < n_acc[:, None], path_tok, jnp.where(ar == n_acc[:, None], nxt[:, None], 0))
    cache = compact_to_path(cache, start, path, n_acc, live)
    # The target's state after the newest accepted token: block index 0 (the root) when
    # nothing was accepted, else 1 + the last node of the accepted path.
    last_node = jnp.take_along_axis(path, jnp.maximum(n_acc - 1, 0)[:, None], axis=1)[:, 0]
    at = jnp.where(n_acc > 0, last_node + 1, 0)
    pstate = proposer.observe(pstate, VerifyOutput(block=block, positions=positions, hidden=hidden, n_acc=n_acc,
                                                   accepted_at=at, live=live, logits=logits))
    return SpecState(rows=loop.emit(rows.replace(rng=d.rng), new, n_acc + 1, max_new, eos_ids), cache=cache,
                     pstate=pstate, stats=loop.count_round(s.stats, live, tree.valid.sum(1).astype(jnp.int32), n_acc))


@dataclasses.dataclass(frozen=True)
class TreeRound:
    """The token-tree loop for ``loop.decode``: like ``speculative.ChainRound`` with
    ``tree_round``; the verifier defaults to the proposer's ``verifier()``."""

    proposer: Any
    verifier: Callable | None = None
    verify_sizes: tuple[int, ...] | None = None

    def init(self, cfg, params, pparams, prompt, prompt_len, max_new, rng, buffer_len: int, screen) -> SpecState:
        self.proposer.check(cfg)
        return loop.init_speculation(cfg, params, self.proposer, pparams, prompt, prompt_len, max_new, rng,
                                     buffer_len, width=self.proposer.n_nodes, most_accepted=self.proposer.max_depth)

    def step(self, cfg, params, pparams, s: SpecState, sp, max_new, eos_ids, pad_id, screen) -> SpecState:
        verifier = self.verifier if self.verifier is not None else self.proposer.verifier()
        return tree_round(cfg, params, self.proposer, pparams, s, sp, max_new, eos_ids, verifier, screen,
                          self.verify_sizes)

    def stats(self, s: SpecState) -> loop.RoundStats:
        return s.stats


class TreeSpeculativeGenerator(SpeculativeGenerator):
    """Tree-speculative generation for a target model and a tree proposer, the same front end
    as ``SpeculativeGenerator``: ``generate`` takes strings or token lists and returns the
    generated ids and per-row statistics (the same keys; ``proposed`` and ``accepted`` count
    tree nodes)."""

    def __init__(self, cfg: ModelConfig, params: Params, proposer, pparams: Any = None, tokenizer=None,
                 eos_ids: Sequence[int] | None = None, pad_id: int | None = None, verifier: Callable | None = None,
                 greedy_screen=False, verify_sizes: Sequence[int] | None = None):
        proposer.check(cfg)
        self._setup(cfg, params, tokenizer, eos_ids, pad_id, greedy_screen)
        self.proposer, self.pparams = proposer, pparams
        self.verifier = verifier if verifier is not None else proposer.verifier()
        # Variable pass lengths pay off for proposers that put their valid nodes first
        # (``tree.valid_first``) and declare their ``verify_sizes``.
        sizes = verify_sizes if verify_sizes is not None else proposer.verify_sizes
        self.verify_sizes = None if sizes is None else verify_block_sizes(proposer.n_nodes, tuple(sizes))

    def _slots(self, prompt_bucket: int, buffer_len: int) -> tuple[int, str]:
        _, slots = buffer_sizes(prompt_bucket, buffer_len, self.proposer.n_nodes)
        return slots + self.proposer.extra_slots, f"tree slots ({self.proposer.n_nodes} nodes)"

    def _round(self):
        return TreeRound(self.proposer, self.verifier, self.verify_sizes)
