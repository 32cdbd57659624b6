"""Token-tree speculative decoding: a tree proposer drafts, the target
verifies the whole tree in one pass, in one jitted ``lax.while_loop``.

Each round, for every live row:

1. the proposer (``tokax.decode.proposers.tree_proposers``) drafts a tree of
   ``N`` node slots (``tokax.decode.tree.Tree``; static ``N``, per-row shape);
2. the target scores ``[last, node_0 .. node_{N-1}]`` in one forward pass with
   a tree ``block_mask`` (a node sees the cache, the root and its ancestors),
   node ``i`` at position ``t + depth_i`` where ``last`` sits at ``t``;
3. a tree verifier (greedy, recursive rejection, or SpecTr's k-sequential
   selection) accepts a root path of ``n_acc <= max_depth`` nodes and gives
   the next token;
4. the target cache keeps ``last`` and the accepted path
   (``kv_cache.compact``: the path's slots move to the front of the block),
   the proposer sees the verify pass (Token Recycling refreshes its
   adjacency table), and the row advances by ``n_acc + 1`` tokens, cut at a
   stop token or the row's budget.

Lossless like ``tokax.decode.speculative``: greedy output equals plain greedy
decoding (up to float ties between differently shaped forwards); sampled
output follows the target's distribution exactly.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import struct

from tokax.decode.proposers import Context
from tokax.decode.sampling import SamplingParams
from tokax.decode.speculative import SpeculativeGenerator, buffer_sizes, sized_pass, verify_block_sizes
from tokax.decode.tree import block_mask, block_positions, compact_to_path, greedy_tree_accept
from tokax.model import kv_cache as kvc
from tokax.model.config import ModelConfig
from tokax.model.decoder import Params, forward
from tokax.decode.verify import ALWAYS, greedy_path
from tokax.model.screen import ArgmaxScreen


@struct.dataclass
class TreeStats:
    proposed: jax.Array  # [B] valid tree nodes sent to the target
    accepted: jax.Array  # [B] tree nodes accepted
    passes: jax.Array  # [B] target verification passes (rounds while live)
    hist: jax.Array  # [B, D+1] rounds by number of accepted nodes


@struct.dataclass
class TreeState:
    seq: jax.Array  # [B, S] prompt then generated tokens (index = position)
    seq_len: jax.Array  # [B]; seq[seq_len - 1] is not yet in the target cache
    prompt_len: jax.Array  # [B]
    n_gen: jax.Array  # [B]
    cache: kvc.KVCache  # target cache: every token of seq but the newest
    pstate: Any
    rng: jax.Array
    done: jax.Array  # [B] bool
    step: jax.Array  # [] int32
    stats: TreeStats


def _is_stop(tok: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    hit = jnp.zeros(tok.shape, bool)
    for e in eos_ids:
        hit = hit | (tok == e)
    return hit


def tree_buffer_sizes(prompt_bucket: int, buffer_len: int, n_nodes: int) -> tuple[int, int]:
    """(token history length, target cache slots): a round writes ``1 + N``
    slots and appends at most ``max_depth + 1 <= N + 1`` tokens."""
    return buffer_sizes(prompt_bucket, buffer_len, n_nodes)


def init_tree_state(cfg, params, proposer, pparams, prompt, prompt_len, max_new, rng, buffer_len: int) -> TreeState:
    B, P = prompt.shape
    S, cache_len = tree_buffer_sizes(P, buffer_len, proposer.n_nodes)
    seq = jnp.zeros((B, S), jnp.int32).at[:, :P].set(prompt.astype(jnp.int32))
    cache = kvc.init_cache(cfg, B, cache_len)
    ar = jnp.arange(P, dtype=jnp.int32)[None, :]
    positions = jnp.where(ar < (prompt_len - 1)[:, None], ar, -1)  # all prompt tokens but the newest
    _, _, cache = forward(cfg, params, prompt, positions, cache, return_logits=False)
    pstate = proposer.init(params, pparams, prompt, prompt_len, cache_len)
    zeros = jnp.zeros((B,), jnp.int32)
    D = proposer.max_depth
    return TreeState(
        seq=seq, seq_len=prompt_len.astype(jnp.int32), prompt_len=prompt_len.astype(jnp.int32), n_gen=zeros,
        cache=cache, pstate=pstate, rng=rng, done=max_new <= 0, step=jnp.zeros((), jnp.int32),
        stats=TreeStats(proposed=zeros, accepted=zeros, passes=zeros, hist=jnp.zeros((B, D + 1), jnp.int32)),
    )


def tree_step(cfg, params, proposer, pparams, s: TreeState, sp: SamplingParams, max_new, eos_ids,
              verifier, screen: ArgmaxScreen | None = None, verify_sizes: tuple[int, ...] | None = None) -> TreeState:
    """One round: propose a tree, verify it in one target pass, keep the accepted path. With a
    ``screen``, greedy rounds of the built-in verifiers take the target's greedy tokens from it
    (``tokax.model.screen``; the same tokens, cheaper on CPU); Token Recycling, which reads the
    target's top-k, always scores full logits. ``verify_sizes`` (static pass lengths, as in
    ``tokax.decode.speculative``): each round scores only the block up to its last valid node,
    padded to the smallest such length; default one pass over all ``1 + N`` slots."""
    D = proposer.max_depth
    B = s.seq.shape[0]
    live = ~s.done
    rng, k_prop, k_ver = jax.random.split(s.rng, 3)
    ctx = Context(seq=s.seq, seq_len=s.seq_len, live=live)
    tree, pstate = proposer.propose(params, pparams, s.pstate, ctx, sp, k_prop)
    tree = tree.replace(valid=tree.valid & live[:, None])

    last = jnp.take_along_axis(s.seq, (s.seq_len - 1)[:, None], axis=1)  # [B, 1]
    block = jnp.concatenate([last, tree.tokens], axis=1)  # [B, 1+N]
    positions = block_positions(tree, s.seq_len - 1, live)  # [B, 1+N]
    start = s.cache.length
    mask = block_mask(tree.parents)
    N = tree.tokens.shape[1]
    sizes = verify_block_sizes(N, verify_sizes) if verify_sizes is not None else (1 + N,)

    # With the valid nodes first (``valid_first``), a round whose trees are small gets a short pass.
    need = jnp.max(jnp.where(tree.valid, jnp.arange(N, dtype=jnp.int32)[None, :], -1)) + 2  # the last valid node

    def target_pass(greedy):  # ([B, 1+N] greedy tokens or [B, 1+N, V] logits, [B, 1+N, D] hidden, BlockKV)
        return sized_pass(cfg, params, block, positions, s.cache, sizes, need, greedy, screen, mask)

    def greedy_round(_):  # only the target's greedy tokens: from the screen, no float32 logits
        top, h, c = target_pass(True)
        return greedy_tree_accept(top, tree, D), h, c

    def verified_round(_):
        lg, h, c = target_pass(False)
        return verifier(lg, tree, sp, k_ver, D), h, c

    observes_logits = hasattr(proposer, "observe")  # Token Recycling reads the target's top-k
    p_logits = None
    mode = greedy_path(verifier)  # when the verifier needs only the greedy tokens
    if screen is None or observes_logits or mode is None:
        p_logits, hidden, blk = target_pass(False)
        n_acc, path, nxt = verifier(p_logits, tree, sp, k_ver, D)
    elif mode == ALWAYS:
        (n_acc, path, nxt), hidden, blk = greedy_round(None)
    else:  # greedy at temperature 0
        (n_acc, path, nxt), hidden, blk = jax.lax.cond(sp.temperature <= 0.0, greedy_round, verified_round, None)
    cache = kvc.write_block(s.cache, blk)  # outside the branches: in place
    n_acc = jnp.where(live, n_acc, 0)

    # The row's new tokens: the accepted path, then the target's token.
    ar = jnp.arange(D + 1, dtype=jnp.int32)[None, :]
    path_tok = jnp.take_along_axis(tree.tokens, jnp.maximum(path, 0), axis=1)  # [B, D]
    path_tok = jnp.concatenate([path_tok, jnp.zeros((B, 1), jnp.int32)], axis=1)
    new = jnp.where(ar < n_acc[:, None], path_tok, jnp.where(ar == n_acc[:, None], nxt[:, None], 0))
    stop = _is_stop(new, eos_ids) & (ar <= n_acc[:, None])
    first_stop = jnp.where(stop.any(1), jnp.argmax(stop, axis=1), D + 1)
    count = jnp.minimum(jnp.minimum(n_acc + 1, first_stop + 1), max_new - s.n_gen)
    count = jnp.where(live, count, 0)
    done = s.done | (live & ((first_stop < count) | (s.n_gen + count >= max_new)))
    seq = jax.vmap(lambda r, t, p: jax.lax.dynamic_update_slice(r, t, (p,)))(s.seq, new, s.seq_len)

    cache = compact_to_path(cache, start, path, n_acc, live)
    if observes_logits:
        pstate = proposer.observe(pstate, block, p_logits, positions >= 0)
    if hasattr(proposer, "observe_tree_hidden"):
        # The target's state after the newest accepted token: block index 0 (the root) when
        # nothing was accepted, else 1 + the last node of the accepted path.
        last_node = jnp.take_along_axis(path, jnp.maximum(n_acc - 1, 0)[:, None], axis=1)[:, 0]
        at = jnp.where(n_acc > 0, last_node + 1, 0)
        h_acc = jnp.take_along_axis(hidden, at[:, None, None], axis=1)[:, 0]  # [B, D]
        pstate = proposer.observe_tree_hidden(pstate, h_acc, live)
    st = s.stats
    li = live.astype(jnp.int32)
    stats = TreeStats(
        proposed=st.proposed + tree.valid.sum(1).astype(jnp.int32),
        accepted=st.accepted + n_acc,
        passes=st.passes + li,
        hist=st.hist + li[:, None] * jax.nn.one_hot(n_acc, D + 1, dtype=jnp.int32),
    )
    return s.replace(seq=seq, seq_len=s.seq_len + count, n_gen=s.n_gen + count, cache=cache, pstate=pstate,
                     rng=rng, done=done, step=s.step + 1, stats=stats)


@functools.partial(jax.jit, static_argnames=("cfg", "proposer", "buffer_len", "eos_ids", "pad_id", "verifier",
                                             "verify_sizes"))
def tree_speculative_generate(
    cfg: ModelConfig,
    params: Params,
    proposer,
    pparams: Any,
    prompt: jax.Array,  # [B, P] right-padded
    prompt_len: jax.Array,  # [B]
    max_new: jax.Array,  # [B] per-row budget (<= buffer_len)
    sp: SamplingParams,
    rng: jax.Array,
    *,
    buffer_len: int,
    eos_ids: tuple[int, ...] = (1,),
    pad_id: int = 0,
    verifier: Callable | None = None,
    screen: ArgmaxScreen | None = None,
    verify_sizes: tuple[int, ...] | None = None,
):
    """Jitted prefill + tree-speculative while loop. Returns ``(tokens [B,
    buffer_len], n_gen [B], TreeStats)``; ``tokens`` past ``n_gen`` are
    ``pad_id``. ``proposer`` and ``verifier`` are static (hashable); the
    verifier defaults to the proposer's ``verifier()``."""
    proposer.check(cfg)
    verifier = verifier if verifier is not None else proposer.verifier()
    s = init_tree_state(cfg, params, proposer, pparams, prompt, prompt_len, max_new, rng, buffer_len)

    def cond(s: TreeState):
        return (s.step < buffer_len) & ~jnp.all(s.done)

    def body(s: TreeState):
        return tree_step(cfg, params, proposer, pparams, s, sp, max_new, eos_ids, verifier, screen, verify_sizes)

    s = jax.lax.while_loop(cond, body, s)
    i = jnp.arange(buffer_len, dtype=jnp.int32)[None, :]
    out = jnp.take_along_axis(s.seq, s.prompt_len[:, None] + i, axis=1)
    return jnp.where(i < s.n_gen[:, None], out, pad_id), s.n_gen, s.stats


class TreeSpeculativeGenerator(SpeculativeGenerator):
    """Tree-speculative generation for a target model and a tree proposer,
    mirroring ``SpeculativeGenerator``: ``generate`` takes strings or token
    lists and returns the generated ids and per-row statistics (the same keys;
    ``proposed`` and ``accepted`` count tree nodes)."""

    def __init__(self, cfg: ModelConfig, params: Params, proposer, pparams: Any = None, tokenizer=None,
                 eos_ids: Sequence[int] | None = None, pad_id: int | None = None, verifier: Callable | None = None,
                 greedy_screen=False, verify_sizes: Sequence[int] | None = None):
        self._setup(cfg, params, proposer, pparams, tokenizer, eos_ids, pad_id,
                    verifier if verifier is not None else proposer.verifier(), greedy_screen)
        # Variable pass lengths pay off for proposers that put their valid nodes first
        # (``tree.valid_first``) and say so with a ``verify_sizes`` attribute.
        sizes = verify_sizes if verify_sizes is not None else getattr(proposer, "verify_sizes", None)
        self.verify_sizes = None if sizes is None else verify_block_sizes(proposer.n_nodes, tuple(sizes))

    def _slots(self, prompt_bucket: int, buffer_len: int) -> tuple[int, str]:
        _, slots = tree_buffer_sizes(prompt_bucket, buffer_len, self.proposer.n_nodes)
        return slots + getattr(self.proposer, "extra_slots", 0), f"tree slots ({self.proposer.n_nodes} nodes)"

    def _decode(self, prompt, lens, budgets, sp: SamplingParams, rng, buffer_len: int):
        return tree_speculative_generate(
            self.cfg, self.params, self.proposer, self.pparams, prompt, lens, budgets, sp, rng, buffer_len=buffer_len,
            eos_ids=self.eos_ids, pad_id=self.pad_id, verifier=self.verifier, screen=self.screen,
            verify_sizes=self.verify_sizes,
        )
