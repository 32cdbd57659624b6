"""Speculative decoding: a proposer drafts, the target verifies, in one
jitted ``lax.while_loop`` with static shapes.

Each round, for every live row:

1. the proposer (``tokax.decode.proposers``) drafts up to ``K`` tokens
   ``x_1..x_n`` (``K`` is static, ``n`` is data);
2. the target scores ``[last, x_1, .., x_K]`` in one forward pass, writing
   ``K + 1`` slots of its KV cache at positions ``t .. t+K``, where ``last``
   is the newest accepted token (position ``t``), the only accepted token
   not yet in the target cache;
3. a verifier (``tokax.decode.verify``) accepts ``n_acc`` drafts and gives
   the next token from the target (correction or bonus);
4. the target cache keeps ``last`` and the accepted drafts
   (``kv_cache.rollback`` to ``start + n_acc + 1``), the proposer updates
   (rolls back its draft cache, adapts), and the row advances by
   ``n_acc + 1`` tokens, cut at a stop token or the row's budget.

Rows advance by different amounts: positions, cache lengths and the token
history are per row. Every round costs one target pass over the smallest of
a few static block lengths (``verify_block_sizes``: 1, 2, 4, .., K + 1) that
holds the longest live row's ``1 + n`` tokens, so a round with short drafts
(or none: an n-gram miss) costs a short pass; the loop ends when all rows
are done.

Lossless: greedy output equals plain greedy decoding token for token (up to
float ties between the one-token and the ``K + 1``-token forward); sampled
output is distributed exactly as the target's (speculative sampling).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from tokax.errors import ContextTooLong
from tokax.decode.generate import Generator, bucket, pad_prompts
from tokax.decode.proposers import Context
from tokax.decode.sampling import SamplingParams
from tokax.decode.verify import ALWAYS, greedy_accept, greedy_path, verify
from tokax.model import kv_cache as kvc
from tokax.model.config import ModelConfig
from tokax.model.decoder import Params, forward
from tokax.model.screen import ArgmaxScreen, greedy_tokens, screen_for


@struct.dataclass
class SpecStats:
    proposed: jax.Array  # [B] draft tokens proposed to the target
    accepted: jax.Array  # [B] draft tokens accepted
    passes: jax.Array  # [B] target verification passes (rounds while live)
    hist: jax.Array  # [B, K+1] rounds by number of accepted drafts


@struct.dataclass
class SpecState:
    seq: jax.Array  # [B, S] prompt then generated tokens (index = position)
    seq_len: jax.Array  # [B] tokens in seq; seq[seq_len - 1] is not yet in the target cache
    prompt_len: jax.Array  # [B]
    n_gen: jax.Array  # [B]
    cache: kvc.KVCache  # target cache: every token of seq but the newest
    pstate: Any  # the proposer's state
    rng: jax.Array
    done: jax.Array  # [B] bool
    step: jax.Array  # [] int32 rounds so far
    stats: SpecStats


def _is_stop(tok: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    hit = jnp.zeros(tok.shape, bool)
    for e in eos_ids:
        hit = hit | (tok == e)
    return hit


def buffer_sizes(prompt_bucket: int, buffer_len: int, k: int) -> tuple[int, int]:
    """(token history length, KV cache slots) for a prompt bucket, an output
    buffer and ``k`` drafts: a live row has at most ``buffer_len - 1`` new
    tokens before a round that writes ``k + 1`` more."""
    n = prompt_bucket + buffer_len + k + 1
    return n, n


def init_spec_state(cfg, params, proposer, pparams, prompt, prompt_len, max_new, rng, buffer_len: int) -> SpecState:
    B, P = prompt.shape
    K = proposer.k
    S, cache_len = buffer_sizes(P, buffer_len, K)
    seq = jnp.zeros((B, S), jnp.int32).at[:, :P].set(prompt.astype(jnp.int32))
    cache = kvc.init_cache(cfg, B, cache_len)
    ar = jnp.arange(P, dtype=jnp.int32)[None, :]
    # The target cache holds every token but the newest: prefill prompt[:-1].
    positions = jnp.where(ar < (prompt_len - 1)[:, None], ar, -1)
    _, _, cache = forward(cfg, params, prompt, positions, cache, return_logits=False)
    pstate = proposer.init(params, pparams, prompt, prompt_len, cache_len)
    zeros = jnp.zeros((B,), jnp.int32)
    return SpecState(
        seq=seq, seq_len=prompt_len.astype(jnp.int32), prompt_len=prompt_len.astype(jnp.int32), n_gen=zeros,
        cache=cache, pstate=pstate, rng=rng, done=max_new <= 0, step=jnp.zeros((), jnp.int32),
        stats=SpecStats(proposed=zeros, accepted=zeros, passes=zeros, hist=jnp.zeros((B, K + 1), jnp.int32)),
    )


def verify_block_sizes(k: int, sizes: tuple[int, ...] | None, can_be_empty: bool = True) -> tuple[int, ...]:
    """The static verify-pass lengths the loop may pick from each round (the smallest that
    holds the longest live row's ``1 + n`` tokens). Default: 1 (when a proposer can come back
    empty), the powers of two below ``k + 1``, and ``k + 1``. ``(k + 1,)`` gives one fixed pass."""
    if sizes is None:
        sizes = tuple(2**i for i in range(k.bit_length() + 1) if 2**i < k + 1) + (k + 1,)
        if not can_be_empty:
            sizes = tuple(z for z in sizes if z > 1)
    sizes = tuple(sorted(set(int(z) for z in sizes)))
    if not sizes or sizes[0] < 1 or sizes[-1] != k + 1:
        raise ValueError(f"verify_sizes={sizes}: need sizes in 1..k+1 that include k+1={k + 1}")
    return sizes


def sized_pass(cfg, params, block, positions, cache, sizes: tuple[int, ...], need, greedy: bool,
               screen: ArgmaxScreen | None, block_mask=None):
    """The target pass over the first ``size`` tokens of ``block [B, T]``, ``size`` the smallest
    of the static ``sizes`` that is at least ``need`` (traced): on hardware where a pass costs
    about its token count (CPU), short drafts get short passes. Outputs are padded back to ``T``:
    ``([B, T] greedy tokens, or [B, T, V] logits, [B, T, D] hidden, BlockKV)``. The cache is only
    read: the caller stores the block's K/V with ``kvc.write_block`` (all ``T`` slots, the ones
    past the pass empty), outside any ``lax.switch`` / ``cond``, so XLA updates it in place
    instead of copying it through the branches. A greedy pass with a ``screen`` takes the
    greedy tokens from it, without float32 logits. ``block_mask [B, T, T]`` (token trees) is
    cut to the same size."""
    T = block.shape[1]

    def pass_of(size):
        def run(_):
            mask = None if block_mask is None else block_mask[:, :size, :size]
            lg, h, blk = forward(cfg, params, block[:, :size], positions[:, :size], cache, block_mask=mask,
                                 return_logits=not greedy, write_cache=False)
            pad = ((0, 0), (0, T - size))
            out = greedy_tokens(cfg, params, h, screen) if greedy else lg
            return jnp.pad(out, pad + ((0, 0),) * (out.ndim - 2)), jnp.pad(h, pad + ((0, 0),)), blk.pad_to(T)

        return run

    if len(sizes) == 1:
        return pass_of(sizes[0])(None)
    idx = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), need)  # smallest size >= need
    return jax.lax.switch(idx, [pass_of(z) for z in sizes], None)


def spec_step(cfg, params, proposer, pparams, s: SpecState, sp: SamplingParams, max_new, eos_ids, verifier,
              verify_sizes: tuple[int, ...] | None = None, screen: ArgmaxScreen | None = None) -> SpecState:
    """One round: propose, verify in one target pass, keep the accepted prefix. With a ``screen``
    (``tokax.model.screen``) a greedy round takes the target's greedy tokens from it instead of
    the float32 logits: the same tokens, cheaper on CPU."""
    K = proposer.k
    B = s.seq.shape[0]
    live = ~s.done
    rng, k_prop, k_ver = jax.random.split(s.rng, 3)
    ctx = Context(seq=s.seq, seq_len=s.seq_len, live=live)
    prop, pstate = proposer.propose(params, pparams, s.pstate, ctx, sp, k_prop)
    n_draft = jnp.where(live, prop.n, 0)

    last = jnp.take_along_axis(s.seq, (s.seq_len - 1)[:, None], axis=1)  # [B, 1]
    block = jnp.concatenate([last, prop.tokens], axis=1)  # [B, K+1]
    ar = jnp.arange(K + 1, dtype=jnp.int32)[None, :]
    positions = jnp.where(live[:, None], s.seq_len[:, None] - 1 + ar, -1)
    start = s.cache.length

    sizes = verify_block_sizes(K, verify_sizes, getattr(proposer, "can_be_empty", True))

    need = jnp.max(jnp.where(live, n_draft, 0)) + 1  # the longest live row's block

    def target_pass(greedy):  # ([B, K+1] greedy tokens or [B, K+1, V] logits, [B, K+1, D] hidden, BlockKV)
        return sized_pass(cfg, params, block, positions, s.cache, sizes, need, greedy, screen)

    def greedy_round(_):
        top, h, c = target_pass(True)
        return greedy_accept(top, prop.tokens, n_draft), h, c

    def verified_round(_):
        lg, h, c = target_pass(False)
        return verifier(lg, prop.tokens, n_draft, prop.q_logits, sp, k_ver), h, c

    mode = greedy_path(verifier)  # when the verifier needs only the greedy tokens
    if screen is None or mode is None:
        (n_acc, nxt), hidden, blk = verified_round(None)
    elif mode == ALWAYS:
        (n_acc, nxt), hidden, blk = greedy_round(None)
    else:  # greedy at temperature 0, e.g. speculative sampling (full logits) otherwise
        (n_acc, nxt), hidden, blk = jax.lax.cond(sp.temperature <= 0.0, greedy_round, verified_round, None)
    cache = kvc.write_block(s.cache, blk)  # outside the branches: in place

    # The row's new tokens: the accepted drafts, then the target's token.
    drafts = jnp.concatenate([prop.tokens, jnp.zeros((B, 1), jnp.int32)], axis=1)
    new = jnp.where(ar < n_acc[:, None], drafts, jnp.where(ar == n_acc[:, None], nxt[:, None], 0))
    stop = _is_stop(new, eos_ids) & (ar <= n_acc[:, None])
    first_stop = jnp.where(stop.any(1), jnp.argmax(stop, axis=1), K + 1)
    count = jnp.minimum(jnp.minimum(n_acc + 1, first_stop + 1), max_new - s.n_gen)
    count = jnp.where(live, count, 0)
    done = s.done | (live & ((first_stop < count) | (s.n_gen + count >= max_new)))
    seq = jax.vmap(lambda r, t, p: jax.lax.dynamic_update_slice(r, t, (p,)))(s.seq, new, s.seq_len)

    cache = kvc.rollback(cache, jnp.where(live, start + n_acc + 1, start))
    pstate = proposer.update(pstate, ctx, n_draft, n_acc, live)
    if getattr(proposer, "uses_target_hidden", False):
        # Proposers that draft from the target's own hidden states (blockwise
        # heads, Medusa): the verify pass already computed the final-normed
        # hidden of every block position; the one at ``n_acc`` is the state
        # after the newest accepted token, so the next proposal costs no pass.
        pstate = proposer.observe_hidden(pstate, hidden, n_acc, live)
    st = s.stats
    li = live.astype(jnp.int32)
    stats = SpecStats(
        proposed=st.proposed + n_draft,
        accepted=st.accepted + jnp.where(live, n_acc, 0),
        passes=st.passes + li,
        hist=st.hist + li[:, None] * jax.nn.one_hot(n_acc, K + 1, dtype=jnp.int32),
    )
    return s.replace(seq=seq, seq_len=s.seq_len + count, n_gen=s.n_gen + count, cache=cache, pstate=pstate,
                     rng=rng, done=done, step=s.step + 1, stats=stats)


@functools.partial(jax.jit, static_argnames=("cfg", "proposer", "buffer_len", "eos_ids", "pad_id", "verifier",
                                             "verify_sizes"))
def speculative_generate(
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
    verifier: Callable = verify,
    verify_sizes: tuple[int, ...] | None = None,
    screen: ArgmaxScreen | None = None,
):
    """Jitted prefill + speculative while loop. Returns ``(tokens [B,
    buffer_len], n_gen [B], SpecStats)``; ``tokens`` past ``n_gen`` are
    ``pad_id``. ``proposer`` and ``verifier`` are static (hashable);
    ``screen`` (``tokax.model.screen.make_argmax_screen``) makes greedy
    verification cheaper without changing its tokens."""
    proposer.check(cfg)
    s = init_spec_state(cfg, params, proposer, pparams, prompt, prompt_len, max_new, rng, buffer_len)

    def cond(s: SpecState):
        return (s.step < buffer_len) & ~jnp.all(s.done)

    def body(s: SpecState):
        return spec_step(cfg, params, proposer, pparams, s, sp, max_new, eos_ids, verifier, verify_sizes, screen)

    s = jax.lax.while_loop(cond, body, s)
    i = jnp.arange(buffer_len, dtype=jnp.int32)[None, :]
    out = jnp.take_along_axis(s.seq, s.prompt_len[:, None] + i, axis=1)
    return jnp.where(i < s.n_gen[:, None], out, pad_id), s.n_gen, s.stats


def stats_dict(stats: SpecStats, n_gen, row: int) -> dict:
    """Per-row statistics as plain Python numbers (what the job prints)."""
    proposed, accepted, passes = (int(np.asarray(x)[row]) for x in (stats.proposed, stats.accepted, stats.passes))
    n = int(np.asarray(n_gen)[row])
    return {
        "new_tokens": n,
        "proposed": proposed,
        "accepted": accepted,
        "target_passes": passes,
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        "mean_accepted": accepted / passes if passes else 0.0,  # accepted drafts per target pass
        "tokens_per_pass": n / passes if passes else 0.0,
        "accepted_hist": np.asarray(stats.hist)[row].tolist(),  # rounds with 0..K drafts accepted
    }


class SpeculativeGenerator:
    """Speculative generation for a target model and a proposer, mirroring
    ``tokax.decode.generate.Generator``: ``generate`` takes strings or token
    lists and returns the generated ids and per-row statistics.

    ``greedy_screen=True`` verifies greedy rounds through a bfloat16 screen of
    the unembedding (``tokax.model.screen``): the same tokens as the float32
    logits' argmax at about half the cost of a multi-position unembedding on
    CPU, for 335 MB more memory on Gemma 3 270M (float32 params only).

    Subclasses with another loop (``tree_speculative.TreeSpeculativeGenerator``)
    override ``_slots`` (KV cache slots a call needs) and ``_decode`` (the jitted loop)."""

    def __init__(self, cfg: ModelConfig, params: Params, proposer, pparams: Any = None, tokenizer=None,
                 eos_ids: Sequence[int] | None = None, pad_id: int | None = None, verifier: Callable = verify,
                 verify_sizes: Sequence[int] | None = None, greedy_screen=False):
        self._setup(cfg, params, proposer, pparams, tokenizer, eos_ids, pad_id, verifier, greedy_screen)
        self.verify_sizes = verify_block_sizes(proposer.k, tuple(verify_sizes) if verify_sizes is not None else None,
                                               getattr(proposer, "can_be_empty", True))

    def _setup(self, cfg, params, proposer, pparams, tokenizer, eos_ids, pad_id, verifier, greedy_screen=False) -> None:
        proposer.check(cfg)  # e.g. draft/target vocab mismatch
        self.screen = screen_for(params, greedy_screen)
        self.cfg = cfg
        self.params = params
        self.proposer = proposer
        self.pparams = pparams
        self.tokenizer = tokenizer
        self.verifier = verifier
        if eos_ids is None:
            eos_ids = (tokenizer.eos_id,) if tokenizer is not None else (1,)
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self.pad_id = int(pad_id if pad_id is not None else (tokenizer.pad_id if tokenizer is not None else 0))

    encode = Generator.encode  # strings -> ids with BOS, id lists passed through

    def _slots(self, prompt_bucket: int, buffer_len: int) -> tuple[int, str]:
        """KV cache slots one call needs, and what they are (for the error message)."""
        return buffer_sizes(prompt_bucket, buffer_len, self.proposer.k)[1], f"k+1={self.proposer.k + 1} draft slots"

    def _decode(self, prompt, lens, budgets, sp: SamplingParams, rng, buffer_len: int):
        return speculative_generate(
            self.cfg, self.params, self.proposer, self.pparams, prompt, lens, budgets, sp, rng, buffer_len=buffer_len,
            eos_ids=self.eos_ids, pad_id=self.pad_id, verifier=self.verifier, verify_sizes=self.verify_sizes,
            screen=self.screen,
        )

    def generate(
        self,
        prompts,
        max_new_tokens: int | Sequence[int] = 64,
        sampling: SamplingParams | None = None,
        seed: int = 0,
        pad_to: int | None = None,
    ) -> tuple[list[list[int]], list[dict]]:
        """Generated ids (prompt excluded, stop token included) and a stats dict
        per prompt. ``pad_to`` fixes the padded prompt length (default: the
        power-of-two bucket of the longest prompt), so that batches of
        different prompts share one compiled program."""
        ids = self.encode(prompts)
        if pad_to is not None and pad_to < max(len(x) for x in ids):
            raise ValueError(f"pad_to={pad_to} is shorter than the longest prompt ({max(len(x) for x in ids)} tokens)")
        B = len(ids)
        budgets = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (B,)).copy()
        if (budgets < 0).any():
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        prompt, lens = pad_prompts(ids, self.pad_id, pad_to)
        N = bucket(int(budgets.max()), minimum=16)
        slots, what = self._slots(prompt.shape[1], N)
        limit = min(self.cfg.max_seq_len, getattr(getattr(self.proposer, "cfg", None), "max_seq_len", slots))
        if slots > limit:
            raise ContextTooLong(
                f"prompt bucket {prompt.shape[1]} + max_new_tokens bucket {N} + {what} = {slots} exceeds "
                f"max_seq_len={limit}; shorten the prompts or max_new_tokens"
            )
        sp = sampling if sampling is not None else SamplingParams.make()
        toks, n, stats = self._decode(jnp.asarray(prompt), jnp.asarray(lens), jnp.asarray(budgets), sp,
                                      jax.random.PRNGKey(seed), N)
        toks, n = np.asarray(toks), np.asarray(n)
        stats = jax.device_get(stats)
        return [toks[i, : n[i]].tolist() for i in range(B)], [stats_dict(stats, n, i) for i in range(B)]
