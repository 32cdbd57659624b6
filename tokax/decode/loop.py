"""The decode loop every method shares: row state, ``emit``, the jitted runner, the verify
pass of speculative rounds, and the host front end.

A decoding method is a *round*: a pure function from the loop state to the next one,
inside one jitted ``lax.while_loop`` with static shapes. What is the same for every
method lives here:

* ``Rows``: each row's token history (prompt, then generated tokens; index = position),
  its length, budget use, done flag, the rng and the round counter;
* ``emit(rows, new, n_new, max_new, eos_ids)``: append up to ``n_new[b]`` of a round's
  candidate tokens to each live row, cut after a stop token and at the row's budget;
* ``run(state, round, buffer_len)`` / ``outputs(rows, ...)``: the while loop (until every
  row is done or ``buffer_len`` rounds ran) and the generated tokens;
* ``SpecState`` / ``init_speculation`` / ``verify_block`` / ``count_round``: what the
  speculative loops share (the target ``Stream``'s cache, the proposer's state, the
  statistics; one verify pass over a block, read-only, with greedy tokens from the
  bfloat16 screen where the verifier declares it needs only those; the block written
  outside every branch);
* ``FrontEnd``: strings to ids, per-row budgets, padding to power-of-two buckets, the
  context check, and the call of the jitted loop (``Generator``,
  ``SpeculativeGenerator`` and ``TreeSpeculativeGenerator`` are front ends).

The plain loop (``tokax.decode.generate``), the chain loop
(``tokax.decode.speculative``) and the token-tree loop (``tokax.decode.tree_speculative``)
each add only their round.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from tokax.decode.sampling import SamplingParams
from tokax.decode.verify import ALWAYS
from tokax.errors import ContextTooLong
from tokax.model import kv_cache as kvc
from tokax.model.config import ModelConfig
from tokax.model.screen import ArgmaxScreen, greedy_tokens, screen_for
from tokax.model.stream import Stream

# ----------------------------------------------------------------------------
# Row state and emit


@struct.dataclass
class Rows:
    seq: jax.Array  # [B, S] prompt then generated tokens (index = position)
    seq_len: jax.Array  # [B] tokens in seq
    prompt_len: jax.Array  # [B]
    n_gen: jax.Array  # [B] tokens generated so far
    done: jax.Array  # [B] bool
    rng: jax.Array
    step: jax.Array  # [] int32 rounds so far


def init_rows(prompt: jax.Array, prompt_len: jax.Array, max_new: jax.Array, rng: jax.Array, length: int) -> Rows:
    """Rows holding ``prompt [B, P]`` (right-padded, ``prompt_len [B]`` real tokens) in a
    history of ``length`` slots; a row with no budget starts done."""
    B, P = prompt.shape
    seq = jnp.zeros((B, length), jnp.int32).at[:, :P].set(prompt.astype(jnp.int32))
    prompt_len = prompt_len.astype(jnp.int32)
    return Rows(seq=seq, seq_len=prompt_len, prompt_len=prompt_len, n_gen=jnp.zeros((B,), jnp.int32),
                done=max_new <= 0, rng=rng, step=jnp.zeros((), jnp.int32))


def is_stop(tok: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    hit = jnp.zeros(tok.shape, bool)
    for e in eos_ids:
        hit = hit | (tok == e)
    return hit


def emit(rows: Rows, new: jax.Array, n_new: jax.Array, max_new: jax.Array, eos_ids: tuple[int, ...]) -> Rows:
    """Append the first ``n_new[b]`` tokens of ``new [B, M]`` to each live row, cut after its
    first stop token and at its budget ``max_new[b]``; rows that stopped or spent their budget
    become done. ``new`` is written at ``seq_len`` in full (the slots past the kept tokens are
    overwritten later), so the history needs ``M`` slots of slack."""
    live = ~rows.done
    M = new.shape[1]
    ar = jnp.arange(M, dtype=jnp.int32)[None, :]
    stop = is_stop(new, eos_ids) & (ar < n_new[:, None])
    first_stop = jnp.where(stop.any(1), jnp.argmax(stop, axis=1), M)
    count = jnp.minimum(jnp.minimum(n_new, first_stop + 1), max_new - rows.n_gen)
    count = jnp.where(live, count, 0)
    done = rows.done | (live & ((first_stop < count) | (rows.n_gen + count >= max_new)))
    seq = jax.vmap(lambda r, t, p: jax.lax.dynamic_update_slice(r, t, (p,)))(rows.seq, new.astype(jnp.int32),
                                                                             rows.seq_len)
    return rows.replace(seq=seq, seq_len=rows.seq_len + count, n_gen=rows.n_gen + count, done=done,
                        step=rows.step + 1)


def run(state: Any, round_fn: Callable[[Any], Any], buffer_len: int) -> Any:
    """``round_fn`` in a ``lax.while_loop`` until every row of ``state.rows`` is done, at most
    ``buffer_len`` rounds (every live row gains at least one token per round)."""

    def cond(s):
        return (s.rows.step < buffer_len) & ~jnp.all(s.rows.done)

    return jax.lax.while_loop(cond, round_fn, state)


def outputs(rows: Rows, buffer_len: int, pad_id: int) -> tuple[jax.Array, jax.Array]:
    """``(tokens [B, buffer_len], n_gen [B])``: each row's generated tokens, ``pad_id`` after them."""
    i = jnp.arange(buffer_len, dtype=jnp.int32)[None, :]
    out = jnp.take_along_axis(rows.seq, rows.prompt_len[:, None] + i, axis=1)
    return jnp.where(i < rows.n_gen[:, None], out, pad_id), rows.n_gen


@functools.partial(jax.jit, static_argnames=("cfg", "round", "buffer_len", "eos_ids", "pad_id"))
def decode(cfg: ModelConfig, params, round, pparams, prompt: jax.Array, prompt_len: jax.Array, max_new: jax.Array,
           sp: SamplingParams, rng: jax.Array, screen: ArgmaxScreen | None = None, *, buffer_len: int,
           eos_ids: tuple[int, ...] = (1,), pad_id: int = 0):
    """The jitted loop of every method: ``round.init`` (prefill, the method's state), then
    ``round.step`` in ``run`` until every row is done. ``round`` is static (hashable: the method
    and its settings, e.g. ``speculative.ChainRound(proposer, verifier, sizes)``), ``pparams``
    its params; ``prompt [B, P]`` is right-padded with ``prompt_len [B]`` real tokens and
    ``max_new [B]`` per-row budgets (<= ``buffer_len``). ``screen``
    (``tokax.model.screen.make_argmax_screen``) gives greedy tokens without changing them.
    Returns ``(tokens [B, buffer_len], n_gen [B], round.stats(state))``; tokens past ``n_gen``
    are ``pad_id``."""
    s = round.init(cfg, params, pparams, prompt, prompt_len, max_new, rng, buffer_len, screen)
    s = run(s, lambda s: round.step(cfg, params, pparams, s, sp, max_new, eos_ids, pad_id, screen), buffer_len)
    return (*outputs(s.rows, buffer_len, pad_id), round.stats(s))


# ----------------------------------------------------------------------------
# What the speculative loops share


@struct.dataclass
class RoundStats:
    proposed: jax.Array  # [B] draft tokens (tree nodes) sent to the target
    accepted: jax.Array  # [B] of them accepted
    passes: jax.Array  # [B] target verification passes (rounds while live)
    hist: jax.Array  # [B, H+1] rounds by number accepted

    @classmethod
    def zeros(cls, batch: int, most: int) -> "RoundStats":
        z = jnp.zeros((batch,), jnp.int32)
        return cls(proposed=z, accepted=z, passes=z, hist=jnp.zeros((batch, most + 1), jnp.int32))


def count_round(st: RoundStats, live: jax.Array, n_proposed: jax.Array, n_acc: jax.Array) -> RoundStats:
    li = live.astype(jnp.int32)
    return RoundStats(
        proposed=st.proposed + n_proposed,
        accepted=st.accepted + jnp.where(live, n_acc, 0),
        passes=st.passes + li,
        hist=st.hist + li[:, None] * jax.nn.one_hot(n_acc, st.hist.shape[1], dtype=jnp.int32),
    )


@struct.dataclass
class SpecState:
    rows: Rows  # seq[seq_len - 1] (the newest token) is not yet in the target cache
    cache: kvc.KVCache  # the target stream's cache: every token of seq but the newest
    pstate: Any  # the proposer's state
    stats: RoundStats


@struct.dataclass
class VerifyOutput:
    """What a verify pass saw, handed to ``proposer.observe`` after every round."""

    block: jax.Array  # [B, T] tokens scored: the newest accepted token, then the drafts / tree nodes
    positions: jax.Array  # [B, T] their position ids (-1: not scored)
    hidden: jax.Array  # [B, T, D] the target's final-normed hidden states at the block
    n_acc: jax.Array  # [B] drafts / nodes accepted
    accepted_at: jax.Array  # [B] block index of the newest accepted token: hidden[b, accepted_at[b]]
    #                         is the target's state after it (what drafts from the target read)
    live: jax.Array  # [B] rows that were live this round
    logits: jax.Array | None = None  # [B, T, V] float32, only for proposers that declare needs_logits

    @property
    def last_hidden(self) -> jax.Array:
        """``[B, D]``: the target's hidden state after the newest accepted token."""
        return jnp.take_along_axis(self.hidden, self.accepted_at[:, None, None], axis=1)[:, 0]


@struct.dataclass
class Drafted:
    """The start of a speculative round: the proposer has drafted."""

    draft: Any  # a Proposal (chains) or a Tree
    pstate: Any  # the proposer's state after proposing
    ctx: Any  # the Context the proposer saw
    live: jax.Array  # [B] rows live this round
    last: jax.Array  # [B, 1] each row's newest token (the one the target has not seen)
    rng: jax.Array  # the rows' rng for the next round
    k_verify: jax.Array  # the verifier's key for this round


def propose(proposer, params, pparams, s: "SpecState", sp: SamplingParams) -> Drafted:
    """Split the rows' rng (next rounds, proposer, verifier) and let the proposer draft from each
    row's history."""
    from tokax.decode.proposers.base import Context

    rows = s.rows
    live = ~rows.done
    rng, k_prop, k_ver = jax.random.split(rows.rng, 3)
    ctx = Context(seq=rows.seq, seq_len=rows.seq_len, live=live)
    draft, pstate = proposer.propose(params, pparams, s.pstate, ctx, sp, k_prop)
    last = jnp.take_along_axis(rows.seq, (rows.seq_len - 1)[:, None], axis=1)
    return Drafted(draft=draft, pstate=pstate, ctx=ctx, live=live, last=last, rng=rng, k_verify=k_ver)


def buffer_sizes(prompt_bucket: int, buffer_len: int, k: int) -> tuple[int, int]:
    """(token history length, KV cache slots) for a prompt bucket, an output buffer and rounds
    of ``k`` drafts (or tree nodes): a live row has at most ``buffer_len - 1`` new tokens
    before a round that writes ``k + 1`` more."""
    n = prompt_bucket + buffer_len + k + 1
    return n, n


def init_speculation(cfg: ModelConfig, params, proposer, pparams, prompt, prompt_len, max_new, rng,
                     buffer_len: int, width: int, most_accepted: int, extra_slots: int = 0) -> SpecState:
    """Rows, the target's cache holding every prompt token but the newest (the round feeds it
    with its drafts), and the proposer's state. ``width``: tokens a round scores after the
    newest one (``k`` drafts, ``N`` tree nodes); ``extra_slots``: cache slots the proposer
    needs beyond the target's (a draft's catch-up block)."""
    B, P = prompt.shape
    S, cache_len = buffer_sizes(P, buffer_len, width)
    target = Stream.empty(cfg, params, B, cache_len).prefill(prompt, prompt_len - 1)
    pstate = proposer.init(params, pparams, prompt, prompt_len, cache_len + extra_slots)
    return SpecState(rows=init_rows(prompt, prompt_len, max_new, rng, S), cache=target.cache, pstate=pstate,
                     stats=RoundStats.zeros(B, most_accepted))


def verify_block_sizes(k: int, sizes: tuple[int, ...] | None, can_be_empty: bool = True) -> tuple[int, ...]:
    """The static verify-pass lengths a round may pick from (the smallest that holds the longest
    live row's ``1 + n`` tokens). Default: 1 (when a proposer can come back empty), the powers
    of two below ``k + 1``, and ``k + 1``. ``(k + 1,)`` gives one fixed pass."""
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
    read: the caller stores the block with ``Stream.commit`` (all ``T`` slots, the ones past the
    pass empty), outside any ``lax.switch`` / ``cond``, so XLA updates it in place instead of
    copying it through the branches. A greedy pass with a ``screen`` takes the greedy tokens
    from it, without float32 logits. ``block_mask [B, T, T]`` (token trees) is cut to the same size."""
    T = block.shape[1]
    target = Stream(cfg, params, cache)

    def pass_of(size):
        def one(_):
            mask = None if block_mask is None else block_mask[:, :size, :size]
            lg, h, blk = target.score(block[:, :size], positions[:, :size], mask, logits=not greedy)
            pad = ((0, 0), (0, T - size))
            out = greedy_tokens(cfg, params, h, screen) if greedy else lg
            return jnp.pad(out, pad + ((0, 0),) * (out.ndim - 2)), jnp.pad(h, pad + ((0, 0),)), blk.pad_to(T)

        return one

    if len(sizes) == 1:
        return pass_of(sizes[0])(None)
    idx = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), need)  # smallest size >= need
    return jax.lax.switch(idx, [pass_of(z) for z in sizes], None)


def verify_block(cfg, params, cache: kvc.KVCache, block, positions, *, sizes, need, screen, mode, sp: SamplingParams,
                 greedy_fn: Callable, verified_fn: Callable, block_mask=None, keep_logits: bool = False):
    """One verify pass of a round: the target scores ``block`` (through ``sized_pass``) and a
    verifier turns it into the round's result. ``mode`` is the verifier's declared greedy path
    (``tokax.decode.verify.greedy_path``): with a screen, a verifier that needs only the greedy
    tokens gets ``greedy_fn(top [B, T])`` (always, or at temperature 0), any other round
    ``verified_fn(logits [B, T, V])``. ``keep_logits`` (a proposer that reads the target's
    logits) always scores float32 logits. Returns ``(result, hidden [B, T, D], logits or None,
    the cache with the block written)``."""

    def target(greedy):
        return sized_pass(cfg, params, block, positions, cache, sizes, need, greedy, screen, block_mask)

    def greedy_round(_):
        top, h, blk = target(True)
        return greedy_fn(top), h, blk

    def verified_round(_):
        lg, h, blk = target(False)
        return verified_fn(lg), h, blk

    logits = None
    if screen is None or mode is None or keep_logits:
        logits, hidden, blk = target(False)
        result = verified_fn(logits)
        logits = logits if keep_logits else None
    elif mode == ALWAYS:
        result, hidden, blk = greedy_round(None)
    else:  # greedy at temperature 0, the verifier's own rule (full logits) otherwise
        result, hidden, blk = jax.lax.cond(sp.temperature <= 0.0, greedy_round, verified_round, None)
    return result, hidden, logits, Stream(cfg, params, cache).commit(blk).cache  # outside the branches: in place


# ----------------------------------------------------------------------------
# Host front end


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum)."""
    import math

    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None):
    """Right-pad token lists to ``[B, length]`` (default: the bucket of the longest)."""
    if not prompts:
        raise ValueError("no prompts given")
    lens = [len(p) for p in prompts]
    if min(lens) == 0:
        raise ValueError(f"prompt {lens.index(0)} is empty after tokenization; give at least one token")
    P = length or bucket(max(lens))
    arr = np.full((len(prompts), P), pad_id, np.int32)
    for i, p in enumerate(prompts):
        arr[i, : len(p)] = p
    return arr, np.asarray(lens, np.int32)


class FrontEnd:
    """The host side of a decode loop, shared by every generator: ``generate`` takes strings
    (with a tokenizer) or token lists, per-row budgets and sampling parameters, pads the
    prompts to a power-of-two bucket (``pad_to`` fixes it, so batches share one compiled
    program) and the output buffer to another, checks that the cache fits the model, and runs
    the loop (``decode``). Subclasses give ``_round`` (the method's static round), ``_slots``
    (cache slots a call needs) and ``_result`` (what ``generate`` returns)."""

    pparams: Any = None

    def _setup(self, cfg: ModelConfig, params, tokenizer=None, eos_ids: Sequence[int] | None = None,
               pad_id: int | None = None, greedy_screen=False) -> None:
        self.screen = screen_for(params, greedy_screen)
        self.cfg = cfg
        self.params = params
        self.tokenizer = tokenizer
        if eos_ids is None:
            eos_ids = (tokenizer.eos_id,) if tokenizer is not None else (1,)
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self.pad_id = int(pad_id if pad_id is not None else (tokenizer.pad_id if tokenizer is not None else 0))

    def encode(self, prompts):
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("string prompts need a tokenizer; pass token id lists instead")
                out.append(self.tokenizer.encode(p, add_bos=True))
            else:
                out.append([int(t) for t in p])
        return out

    # --- what a loop says about itself ------------------------------------
    def _slots(self, prompt_bucket: int, buffer_len: int) -> tuple[int, str]:
        """KV cache slots one call needs, and what they hold beyond prompt and output."""
        return prompt_bucket + buffer_len, ""

    def _limit(self) -> int:
        return self.cfg.max_seq_len

    def _round(self):
        """The static round ``decode`` runs (hashable)."""
        raise NotImplementedError

    def _decode(self, prompt, lens, budgets, sp: SamplingParams, rng, buffer_len: int):
        return decode(self.cfg, self.params, self._round(), self.pparams, prompt, lens, budgets, sp, rng, self.screen,
                      buffer_len=buffer_len, eos_ids=self.eos_ids, pad_id=self.pad_id)

    def _result(self, toks: np.ndarray, n: np.ndarray, stats):
        return [toks[i, : n[i]].tolist() for i in range(len(n))]

    # --- the call ---------------------------------------------------------
    def generate(self, prompts, max_new_tokens: int | Sequence[int] = 64, sampling: SamplingParams | None = None,
                 seed: int = 0, pad_to: int | None = None):
        """Generated ids (prompt excluded, stop token included) per prompt (speculative
        generators: and a statistics dict per prompt). ``pad_to`` fixes the padded prompt
        length (default: the power-of-two bucket of the longest prompt)."""
        ids = self.encode(prompts)
        B = len(ids)
        budgets = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (B,)).copy()
        if (budgets < 0).any():
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if pad_to is not None and ids and pad_to < max(len(x) for x in ids):
            raise ValueError(f"pad_to={pad_to} is shorter than the longest prompt ({max(len(x) for x in ids)} tokens)")
        prompt, lens = pad_prompts(ids, self.pad_id, pad_to)
        N = bucket(int(budgets.max()), minimum=16)
        slots, what = self._slots(prompt.shape[1], N)
        limit = self._limit()
        if slots > limit:
            more = f" + {what}" if what else ""
            raise ContextTooLong(
                f"prompt bucket {prompt.shape[1]} + max_new_tokens bucket {N}{more} = {slots} exceeds "
                f"max_seq_len={limit}; shorten the prompts or max_new_tokens")
        sp = sampling if sampling is not None else SamplingParams.make()
        toks, n, stats = self._decode(jnp.asarray(prompt), jnp.asarray(lens), jnp.asarray(budgets), sp,
                                      jax.random.PRNGKey(seed), N)
        return self._result(np.asarray(toks), np.asarray(n), stats)
