"""Autoregressive generation: prefill, then one jitted ``lax.while_loop``.

The loop state is an explicit ``DecodeState``; every decoding method in
``tokax.decode`` is a ``step(state) -> state`` over such a state. Shapes are
static: prompts are right-padded to a length bucket and the output buffer to a
token bucket, so a new prompt of similar size reuses the compiled program
(``Generator`` keeps one compiled function per (batch, prompt bucket, token
bucket)).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from tokax.errors import ContextTooLong
from tokax.decode.sampling import SamplingParams, sample
from tokax.model import kv_cache as kvc
from tokax.model.config import ModelConfig
from tokax.model.decoder import Params, forward, unembed
from tokax.model.screen import ArgmaxScreen, screen_for, screened_argmax


@struct.dataclass
class DecodeState:
    tokens: jax.Array  # [B, N] generated ids (pad after a row stops)
    n_gen: jax.Array  # [B] tokens generated so far per row
    next_pos: jax.Array  # [B] position id of the next token fed to the model
    logits: jax.Array  # [B, V] logits for the next token; with a screen, the final hidden state [B, D]
    cache: kvc.KVCache
    rng: jax.Array
    done: jax.Array  # [B] bool
    step: jax.Array  # [] int32 loop iteration


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def prefill(cfg: ModelConfig, params: Params, prompt: jax.Array, prompt_len: jax.Array, cache: kvc.KVCache,
            hidden_only: bool = False):
    """Run right-padded prompts ``[B, P]`` (true lengths ``[B]``) through the
    model; returns the logits of each row's last prompt token ``[B, V]`` (with
    ``hidden_only``, its final hidden state ``[B, D]``) and the filled cache
    (padding slots hold position -1 and are never attended)."""
    B, P = prompt.shape
    ar = jnp.arange(P, dtype=jnp.int32)[None, :]
    positions = jnp.where(ar < prompt_len[:, None], ar, -1)
    _, hidden, cache = forward(cfg, params, prompt, positions, cache, return_logits=False)
    last = jnp.take_along_axis(hidden, (prompt_len - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
    return (last if hidden_only else unembed(cfg, params, last)), cache


def _stop(tok: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    hit = jnp.zeros(tok.shape, bool)
    for e in eos_ids:
        hit = hit | (tok == e)
    return hit


def init_state(cfg, params, prompt, prompt_len, rng, buffer_len: int, screen: ArgmaxScreen | None = None) -> DecodeState:
    B, P = prompt.shape
    cache = kvc.init_cache(cfg, B, P + buffer_len)
    logits, cache = prefill(cfg, params, prompt, prompt_len, cache, hidden_only=screen is not None)
    return DecodeState(
        tokens=jnp.zeros((B, buffer_len), jnp.int32),
        n_gen=jnp.zeros((B,), jnp.int32),
        next_pos=prompt_len.astype(jnp.int32),
        logits=logits,
        cache=cache,
        rng=rng,
        done=jnp.zeros((B,), bool),
        step=jnp.zeros((), jnp.int32),
    )


def next_token(cfg, params, key, head: jax.Array, sp: SamplingParams, screen: ArgmaxScreen | None) -> jax.Array:
    """One token per row from ``head``: logits ``[B, V]``, or with a ``screen`` the final hidden
    state ``[B, D]``, whose greedy token comes from the screen (``tokax.model.screen``: the float32
    argmax, without the float32 unembedding) and whose sampled token from its logits."""
    if screen is None:
        return sample(key, head, sp)
    return jax.lax.cond(sp.temperature <= 0.0, lambda _: screened_argmax(screen, params["embed"], head),
                        lambda _: sample(key, unembed(cfg, params, head), sp), None)


def decode_step(cfg, params, state: DecodeState, sp: SamplingParams, max_new: jax.Array, eos_ids, pad_id: int,
                screen: ArgmaxScreen | None = None) -> DecodeState:
    """Sample one token per live row, append it, and feed it to the model."""
    rng, key = jax.random.split(state.rng)
    tok = next_token(cfg, params, key, state.logits, sp, screen)
    live = ~state.done
    tok = jnp.where(live, tok, pad_id)
    tokens = state.tokens.at[:, state.step].set(tok)
    n_gen = state.n_gen + live.astype(jnp.int32)
    done = state.done | (live & _stop(tok, eos_ids)) | (n_gen >= max_new)
    pos = jnp.where(live, state.next_pos, -1)  # finished rows write empty slots
    logits, hidden, cache = forward(cfg, params, tok[:, None], pos[:, None], state.cache,
                                    return_logits=screen is None)
    return state.replace(
        tokens=tokens,
        n_gen=n_gen,
        next_pos=state.next_pos + 1,
        logits=(logits if screen is None else hidden)[:, 0],
        cache=cache,
        rng=rng,
        done=done,
        step=state.step + 1,
    )


@functools.partial(jax.jit, static_argnames=("cfg", "buffer_len", "eos_ids", "pad_id"))
def generate_tokens(
    cfg: ModelConfig,
    params: Params,
    prompt: jax.Array,  # [B, P] right-padded
    prompt_len: jax.Array,  # [B]
    max_new: jax.Array,  # [B] per-row budget (<= buffer_len)
    sp: SamplingParams,
    rng: jax.Array,
    *,
    buffer_len: int,
    eos_ids: tuple[int, ...] = (1,),
    pad_id: int = 0,
    screen: ArgmaxScreen | None = None,
):
    """Jitted prefill + while-loop decode. Returns ``(tokens [B, buffer_len], n_gen [B])``.
    With a ``screen``, greedy tokens come from it (the same tokens, cheaper on CPU)."""
    state = init_state(cfg, params, prompt, prompt_len, rng, buffer_len, screen)
    state = state.replace(done=max_new <= 0)

    def cond(s: DecodeState):
        return (s.step < buffer_len) & ~jnp.all(s.done)

    def body(s: DecodeState):
        return decode_step(cfg, params, s, sp, max_new, eos_ids, pad_id, screen)

    state = jax.lax.while_loop(cond, body, state)
    return state.tokens, state.n_gen


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


class Generator:
    """Generation for a model and tokenizer, with compiled programs cached per
    shape bucket. ``generate`` takes strings or token lists. ``greedy_screen=True``
    (float32 params) takes greedy tokens from the bfloat16 screen of the
    unembedding (``tokax.model.screen``): the same tokens, cheaper on CPU."""

    def __init__(self, cfg: ModelConfig, params: Params, tokenizer=None, eos_ids: Sequence[int] | None = None,
                 pad_id: int | None = None, greedy_screen=False):
        self.cfg = cfg
        self.params = params
        self.screen = screen_for(params, greedy_screen)
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

    def generate(
        self,
        prompts,
        max_new_tokens: int | Sequence[int] = 64,
        sampling: SamplingParams | None = None,
        seed: int = 0,
        pad_to: int | None = None,
    ) -> list[list[int]]:
        """Generated ids (prompt excluded, stop token included) per prompt.

        ``pad_to`` fixes the padded prompt length (default: the power-of-two
        bucket of the longest prompt); callers with many batches pass one
        value for all of them so that a single program serves every batch.
        """
        ids = self.encode(prompts)
        B = len(ids)
        budgets = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (B,)).copy()
        if (budgets < 0).any():
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if pad_to is not None and pad_to < max(len(x) for x in ids):
            raise ValueError(f"pad_to={pad_to} is shorter than the longest prompt ({max(len(x) for x in ids)} tokens)")
        prompt, lens = pad_prompts(ids, self.pad_id, pad_to)
        N = bucket(int(budgets.max()), minimum=16)
        total = prompt.shape[1] + N
        if total > self.cfg.max_seq_len:
            raise ContextTooLong(
                f"prompt bucket {prompt.shape[1]} + max_new_tokens bucket {N} = {total} exceeds the "
                f"model's max_seq_len={self.cfg.max_seq_len}; shorten the prompts or max_new_tokens"
            )
        sp = sampling if sampling is not None else SamplingParams.make()
        toks, n = generate_tokens(
            self.cfg, self.params, jnp.asarray(prompt), jnp.asarray(lens), jnp.asarray(budgets), sp,
            jax.random.PRNGKey(seed), buffer_len=N, eos_ids=self.eos_ids, pad_id=self.pad_id, screen=self.screen,
        )
        toks, n = np.asarray(toks), np.asarray(n)
        return [toks[i, : n[i]].tolist() for i in range(B)]
