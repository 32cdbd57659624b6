"""Autoregressive generation: prefill, then one jitted ``lax.while_loop`` (``tokax.decode.loop``).

The plain round: sample one token per live row from the logits of its newest
token (or, with the bfloat16 screen, take the greedy token from the final
hidden state), ``emit`` it, feed it to the model. Shapes are static: prompts
are right-padded to a length bucket and the output buffer to a token bucket,
so a new prompt of similar size reuses the compiled program (``Generator``
keeps one compiled function per (batch, prompt bucket, token bucket)).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from tokax.decode import loop
from tokax.decode.loop import bucket, pad_prompts  # noqa: F401  (part of this module's API)
from tokax.decode.sampling import SamplingParams, sample
from tokax.model import kv_cache as kvc
from tokax.model.config import ModelConfig
from tokax.model.decoder import Params, unembed
from tokax.model.screen import ArgmaxScreen, screened_argmax
from tokax.model.stream import Stream


@struct.dataclass
class PlainState:
    rows: loop.Rows
    cache: kvc.KVCache  # every token of the rows' history
    head: jax.Array  # [B, V] logits for the next token; with a screen, the final hidden state [B, D]


def prefill(cfg: ModelConfig, params: Params, prompt: jax.Array, prompt_len: jax.Array, cache: kvc.KVCache,
            hidden_only: bool = False):
    """Run right-padded prompts ``[B, P]`` (true lengths ``[B]``) through the
    model; returns the logits of each row's last prompt token ``[B, V]`` (with
    ``hidden_only``, its final hidden state ``[B, D]``) and the filled cache
    (padding slots hold position -1 and are never attended)."""
    P = prompt.shape[1]
    ar = jnp.arange(P, dtype=jnp.int32)[None, :]
    positions = jnp.where(ar < prompt_len[:, None], ar, -1)
    _, hidden, s = Stream(cfg, params, cache).extend(prompt, positions, logits=False)
    last = jnp.take_along_axis(hidden, (prompt_len - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
    return (last if hidden_only else unembed(cfg, params, last)), s.cache


def next_token(cfg, params, key, head: jax.Array, sp: SamplingParams, screen: ArgmaxScreen | None) -> jax.Array:
    """One token per row from ``head``: logits ``[B, V]``, or with a ``screen`` the final hidden
    state ``[B, D]``, whose greedy token comes from the screen (``tokax.model.screen``: the float32
    argmax, without the float32 unembedding) and whose sampled token from its logits."""
    if screen is None:
        return sample(key, head, sp)
    return jax.lax.cond(sp.temperature <= 0.0, lambda _: screened_argmax(screen, params["embed"], head),
                        lambda _: sample(key, unembed(cfg, params, head), sp), None)


def plain_round(cfg, params, s: PlainState, sp: SamplingParams, max_new: jax.Array, eos_ids, pad_id: int,
                screen: ArgmaxScreen | None = None) -> PlainState:
    """Sample one token per live row, append it, and feed it to the model."""
    rows = s.rows
    rng, key = jax.random.split(rows.rng)
    live = ~rows.done
    tok = jnp.where(live, next_token(cfg, params, key, s.head, sp, screen), pad_id)
    pos = jnp.where(live, rows.seq_len, -1)  # finished rows write empty slots
    rows = loop.emit(rows.replace(rng=rng), tok[:, None], jnp.ones_like(rows.seq_len), max_new, eos_ids)
    logits, hidden, target = Stream(cfg, params, s.cache).extend(tok[:, None], pos[:, None], logits=screen is None)
    return PlainState(rows=rows, cache=target.cache, head=(logits if screen is None else hidden)[:, 0])


@dataclasses.dataclass(frozen=True)
class PlainRound:
    """The plain loop for ``loop.decode``: prefill the whole prompt, then ``plain_round``."""

    def init(self, cfg, params, pparams, prompt, prompt_len, max_new, rng, buffer_len: int, screen) -> PlainState:
        B, P = prompt.shape
        head, cache = prefill(cfg, params, prompt, prompt_len, kvc.init_cache(cfg, B, P + buffer_len),
                              hidden_only=screen is not None)
        rows = loop.init_rows(prompt, prompt_len, max_new, rng, P + buffer_len + 1)  # + 1: emit's slack
        return PlainState(rows=rows, cache=cache, head=head)

    def step(self, cfg, params, pparams, s: PlainState, sp, max_new, eos_ids, pad_id, screen) -> PlainState:
        return plain_round(cfg, params, s, sp, max_new, eos_ids, pad_id, screen)

    def stats(self, s: PlainState):
        return None


def generate_tokens(cfg: ModelConfig, params: Params, prompt: jax.Array, prompt_len: jax.Array, max_new: jax.Array,
                    sp: SamplingParams, rng: jax.Array, *, buffer_len: int, eos_ids: tuple[int, ...] = (1,),
                    pad_id: int = 0, screen: ArgmaxScreen | None = None):
    """Jitted prefill + while-loop decode (``loop.decode`` with ``PlainRound``): ``prompt [B, P]``
    right-padded, ``max_new [B]`` per-row budgets (<= ``buffer_len``). Returns ``(tokens [B,
    buffer_len], n_gen [B])``. With a ``screen``, greedy tokens come from it (the same tokens,
    cheaper on CPU)."""
    toks, n, _ = loop.decode(cfg, params, PlainRound(), None, prompt, prompt_len, max_new, sp, rng, screen,
                             buffer_len=buffer_len, eos_ids=eos_ids, pad_id=pad_id)
    return toks, n


class Generator(loop.FrontEnd):
    """Generation for a model and tokenizer, with compiled programs cached per
    shape bucket. ``generate`` takes strings or token lists and returns the generated ids
    per prompt. ``greedy_screen=True`` (float32 params) takes greedy tokens from the
    bfloat16 screen of the unembedding (``tokax.model.screen``): the same tokens, cheaper on CPU."""

    def __init__(self, cfg: ModelConfig, params: Params, tokenizer=None, eos_ids: Sequence[int] | None = None,
                 pad_id: int | None = None, greedy_screen=False):
        self._setup(cfg, params, tokenizer, eos_ids, pad_id, greedy_screen)

    def _round(self):
        return PlainRound()
