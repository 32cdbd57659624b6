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

from tokax.decode.proposers import Context, Proposal
from tokax.decode.sampling import SamplingParams, sample
from tokax.model import kv_cache as kvc
from tokax.model.config import ModelConfig
from tokax.model.decoder import Params, forward, unembed


# Logit of the tokens outside a subset head: exp(NEG - max) is exactly 0 in float32, so q = 0
# there, without the inf - inf = nan that -inf could produce in downstream arithmetic.
NEG_LOGIT = -1e30


def is_subset_head(p: Any) -> bool:
    """Whether draft params ``p`` carry a head over a token subset
    (``subset_head_params``) instead of the tied full-vocabulary head."""
    return isinstance(p, dict) and "head_ids" in p


def subset_head_params(decoder_params: Params, head_ids: jax.Array) -> dict:
    """Draft params whose output head covers only ``head_ids [S]`` (sorted,
    distinct): their rows of the tied embedding, gathered once here so that a
    draft step costs ``S`` instead of ``V`` dot products. The draft's
    distribution is the full head's conditioned on the subset, q(v) = 0 for
    v outside it; speculative sampling stays exact for any q."""
    ids = jnp.asarray(head_ids, jnp.int32)
    return {"decoder": decoder_params, "head_ids": ids, "head_w": jnp.take(decoder_params["embed"], ids, axis=0)}


def decoder_of(p: Any) -> Params:
    return p["decoder"] if is_subset_head(p) else p


def draft_unembed(cfg: ModelConfig, p: Any, hidden: jax.Array) -> jax.Array:
    """Draft logits ``[..., V]`` float32 from final-normed ``hidden [..., D]``."""
    if not is_subset_head(p):
        return unembed(cfg, p, hidden)
    sub = jnp.einsum("...d,sd->...s", hidden, p["head_w"].astype(hidden.dtype), preferred_element_type=jnp.float32)
    full = jnp.full((*hidden.shape[:-1], cfg.vocab_size), NEG_LOGIT, jnp.float32)
    return full.at[..., p["head_ids"]].set(sub)


def draft_forward(cfg: ModelConfig, p: Any, tokens, positions, cache=None, block_mask=None, return_logits=True,
                  write_cache: bool = True):
    """``forward`` for draft params with either head: ``(logits or None, hidden, cache)``
    (with ``write_cache=False``, the block's ``BlockKV`` in place of the cache)."""
    _, hidden, cache = forward(cfg, decoder_of(p), tokens, positions, cache, block_mask, return_logits=False,
                               write_cache=write_cache)
    return (draft_unembed(cfg, p, hidden) if return_logits else None), hidden, cache


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
class DraftModelProposer:
    """A separate draft decoder (``cfg``) with params ``pparams`` proposing up
    to ``k`` tokens per round."""

    cfg: ModelConfig  # the draft's config
    k: int = 4
    can_be_empty = False  # always proposes >= 1 token per live row (class constant, not a field)

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k={self.k}: the number of draft tokens per round must be >= 1")

    # --- hooks for subclasses -------------------------------------------------
    def check(self, target_cfg: ModelConfig) -> None:
        check_vocab(self.cfg, target_cfg)

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
        B, P = prompt.shape
        cache = kvc.init_cache(self.cfg, B, cache_len)
        ar = jnp.arange(P, dtype=jnp.int32)[None, :]
        positions = jnp.where(ar < (prompt_len - 2)[:, None], ar, -1)
        _, _, cache = draft_forward(self.cfg, self.draft_params(tparams, pparams), prompt, positions, cache,
                                    return_logits=False)
        return DraftState(cache=cache, start=cache.length)

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
        _, hidden, cache = draft_forward(cfg, dp, toks, pos, st.cache, return_logits=False)
        q1 = draft_unembed(cfg, dp, hidden[:, 1])  # only the newest token's logits are needed
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

        def body(c):
            i, drafts, qlog, n, active, score, cache = c
            d_prev = jnp.take_along_axis(drafts, (i - 1) * jnp.ones((B, 1), jnp.int32), axis=1)  # [B, 1]
            p = jnp.where(active, last_i + i, -1)[:, None]
            lg, hid, cache = draft_forward(cfg, dp, d_prev, p, cache)
            ok, score = self.continue_before(pparams, hid[:, 0], score)
            active = active & ok
            drafts, qlog, n, active = draw(i, lg[:, 0], drafts, qlog, n, active)
            return i + 1, drafts, qlog, n, active, score, cache

        _, drafts, qlog, n, _, _, cache = jax.lax.while_loop(
            cond, body, (jnp.asarray(1, jnp.int32), drafts, qlog, n, active, score, cache)
        )
        return Proposal(tokens=drafts, n=n, q_logits=qlog), DraftState(cache=cache, start=start)

    def update(self, st: DraftState, ctx: Context, n_draft, n_acc, live) -> DraftState:
        """Keep ``[prev, last, x_1 .. x_{n_acc - 1}]`` of this round (nothing for finished rows)."""
        keep = jnp.where(live, st.start + n_acc + 1, st.start)
        return DraftState(cache=kvc.rollback(st.cache, keep), start=keep)


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
