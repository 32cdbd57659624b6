"""Chain drafting with a small decoder that shares the target's vocabulary
(Leviathan et al. 2023; Chen et al. 2023).

Each round the draft proposes ``x_i ~ q_i = q(. | context, x_<i)`` for
``i = 1..K`` (argmax when greedy), one draft forward per token, keeping its
own KV cache. The target then verifies all of them in one pass.

Cache bookkeeping (static shapes, rows advance by different amounts): at the
start of a round the draft cache holds every accepted token except the last
two of the row, ``prev`` and ``last``. The round's first draft call writes
``[prev, last]`` (``prev`` gets position -1, an empty slot, when the row has
a single token), then one call per further draft. After the target accepted
``n`` drafts the cache keeps ``[prev, last, x_1 .. x_{n-1}]`` (``n + 1``
slots): the next round starts again with the two newest tokens,
``x_n`` and the target's bonus token. Feeding two tokens instead of one
avoids a separate draft call for ``x_K`` when every draft is accepted.

Subclasses end a round early (``KangarooProposer``: draft confidence,
``SpecDecPPProposer``: predicted rejection). Ending early is a function of
the drafts already made and of ``q`` before its token is drawn, so the
drafts stay distributed as ``q`` and speculative sampling stays exact.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from tokax.decode.proposers.base import ChainProposer, Context, Proposal
from tokax.decode.sampling import SamplingParams, sample
from tokax.model import kv_cache as kvc
from tokax.model.config import ModelConfig
from tokax.model.decoder import Params
from tokax.model.heads import subset_head_params  # noqa: F401  (draft params with a subset head)
from tokax.model.stream import Stream, head_logits


def draft_unembed(cfg: ModelConfig, p: Any, hidden: jax.Array) -> jax.Array:
    """Draft logits ``[..., V]`` float32 from final-normed ``hidden [..., D]`` (either head)."""
    return head_logits(cfg, p, hidden)


def draft_forward(cfg: ModelConfig, p: Any, tokens, positions, cache=None, block_mask=None, return_logits=True,
                  write_cache: bool = True):
    """A draft model's pass with either head: ``(logits or None, hidden, cache)`` (with
    ``write_cache=False``, the block's ``BlockKV`` in place of the cache; ``cache=None``: a
    cache-free forward over the whole sequence)."""
    s = Stream(cfg, p, cache)
    if cache is not None and not write_cache:
        return s.score(tokens, positions, block_mask, logits=return_logits)
    logits, hidden, s = s.extend(tokens, positions, block_mask, logits=return_logits)
    return logits, hidden, s.cache


@struct.dataclass
class DraftState:
    cache: kvc.KVCache  # the draft's own cache
    start: jax.Array  # [B] cache length when the current round began


def check_vocab(draft_cfg: ModelConfig, target_cfg: ModelConfig, what: str = "draft model") -> None:
    """Speculative decoding compares p and q token by token: the vocabularies must be the same."""
    if draft_cfg.vocab_size != target_cfg.vocab_size:
        raise ValueError(
            f"{what} vocab_size={draft_cfg.vocab_size} differs from the target's vocab_size="
            f"{target_cfg.vocab_size}; speculative decoding needs a draft with the target's tokenizer"
        )


@dataclasses.dataclass(frozen=True)
class DraftModelProposer(ChainProposer):
    """A separate draft decoder (``cfg``) with params ``pparams`` proposing up
    to ``k`` tokens per round, on its own ``Stream`` (its KV cache in the state)."""

    cfg: ModelConfig  # the draft's config
    k: int = 4
    can_be_empty = False  # always proposes >= 1 token per live row (class constant, not a field)

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k={self.k}: the number of draft tokens per round must be >= 1")

    def check(self, target_cfg: ModelConfig) -> None:
        check_vocab(self.cfg, target_cfg)

    def context_limit(self) -> int:
        return self.cfg.max_seq_len

    # --- hooks for subclasses -------------------------------------------------

    def draft_params(self, tparams: Params, pparams: Any) -> Params:
        """The decoder params the draft runs with."""
        return pparams

    def continue_before(self, pparams: Any, hidden: jax.Array, score: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Whether to draw another token, seen from the draft's hidden state
        ``[B, D]`` after it read the newest draft; ``score [B]`` is carried
        across the round (starts at 1). Default: always."""
        return jnp.ones(hidden.shape[:1], bool), score

    def continue_after(self, q_logits: jax.Array) -> jax.Array:
        """Whether to draw another token after drawing one from ``q_logits [B, V]``. Default: always."""
        return jnp.ones(q_logits.shape[:1], bool)

    # --- proposer protocol ----------------------------------------------------
    def init(self, tparams, pparams, prompt: jax.Array, prompt_len: jax.Array, cache_len: int) -> DraftState:
        """Prefill the draft cache with all prompt tokens but the last two."""
        draft = Stream.empty(self.cfg, self.draft_params(tparams, pparams), prompt.shape[0], cache_len)
        draft = draft.prefill(prompt, prompt_len - 2)
        return DraftState(cache=draft.cache, start=draft.length)

    def propose(self, tparams, pparams, st: DraftState, ctx: Context, sp: SamplingParams, rng: jax.Array):
        cfg, K = self.cfg, self.k
        dp = self.draft_params(tparams, pparams)
        B = ctx.seq.shape[0]
        V = cfg.vocab_size
        live = ctx.live
        start = st.cache.length
        last_i = ctx.seq_len - 1
        prev_i = ctx.seq_len - 2

        def seq_at(idx):
            return jnp.take_along_axis(ctx.seq, jnp.maximum(idx, 0)[:, None], axis=1)[:, 0]

        toks = jnp.stack([seq_at(prev_i), seq_at(last_i)], axis=1)  # [B, 2]
        pos = jnp.stack([jnp.where(live & (prev_i >= 0), prev_i, -1), jnp.where(live, last_i, -1)], axis=1)
        _, hidden, draft = Stream(cfg, dp, st.cache).extend(toks, pos, logits=False)
        q1 = draft.logits(hidden[:, 1])  # only the newest token's logits are needed
        keys = jax.random.split(rng, K)

        def draw(i, q, drafts, qlog, n, active):
            """Draw x_{i+1} ~ q for active rows and record it."""
            d = sample(keys[i], q, sp)
            drafts = drafts.at[:, i].set(jnp.where(active, d, 0))
            qlog = qlog.at[:, i].set(q)
            n = jnp.where(active, i + 1, n)
            active = active & self.continue_after(q)
            return drafts, qlog, n, active

        drafts = jnp.zeros((B, K), jnp.int32)
        qlog = jnp.zeros((B, K, V), jnp.float32)
        n = jnp.zeros((B,), jnp.int32)
        drafts, qlog, n, active = draw(0, q1, drafts, qlog, n, live)
        score = jnp.ones((B,), jnp.float32)

        def cond(c):
            i, _, _, _, active, _, _ = c
            return (i < K) & jnp.any(active)

        def body(c):  # carries the draft's cache only (its params are the closure's)
            i, drafts, qlog, n, active, score, cache = c
            d_prev = jnp.take_along_axis(drafts, (i - 1) * jnp.ones((B, 1), jnp.int32), axis=1)  # [B, 1]
            p = jnp.where(active, last_i + i, -1)[:, None]
            lg, hid, d = Stream(cfg, dp, cache).extend(d_prev, p)
            ok, score = self.continue_before(pparams, hid[:, 0], score)
            active = active & ok
            drafts, qlog, n, active = draw(i, lg[:, 0], drafts, qlog, n, active)
            return i + 1, drafts, qlog, n, active, score, d.cache

        _, drafts, qlog, n, _, _, cache = jax.lax.while_loop(
            cond, body, (jnp.asarray(1, jnp.int32), drafts, qlog, n, active, score, draft.cache)
        )
        return Proposal(tokens=drafts, n=n, q_logits=qlog), DraftState(cache=cache, start=start)

    def update(self, st: DraftState, ctx: Context, n_draft, n_acc, live) -> DraftState:
        """Keep ``[prev, last, x_1 .. x_{n_acc - 1}]`` of this round (nothing for finished rows)."""
        keep = jnp.where(live, st.start + n_acc + 1, st.start)
        return DraftState(cache=kvc.rollback(st.cache, keep), start=keep)  # a rollback needs no params


def truncated_draft(target_cfg: ModelConfig, tparams: Params, n_layers: int) -> tuple[ModelConfig, Params]:
    """A draft made of the target's first ``n_layers`` layers, its final norm
    and its (tied) LM head: a stand-in until a distilled draft exists. The
    params are the target's own arrays (no copy)."""
    if not 1 <= n_layers <= target_cfg.n_layers:
        raise ValueError(f"draft n_layers={n_layers} must be in [1, {target_cfg.n_layers}] (the target's depth)")
    cfg = target_cfg.replace(n_layers=n_layers, name=f"{target_cfg.name}-first{n_layers}")
    params = {"embed": tparams["embed"], "final_norm": tparams["final_norm"]}
    for i in range(n_layers):
        params[f"layer_{i}"] = tparams[f"layer_{i}"]
    return cfg, params
