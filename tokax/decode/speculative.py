"""Speculative decoding: a proposer drafts a chain, the target verifies it, in the shared
decode loop (``tokax.decode.loop``).

Each round, for every live row:

1. the proposer (``tokax.decode.proposers``) drafts up to ``K`` tokens
   ``x_1..x_n`` (``K`` is static, ``n`` is data);
2. the target scores ``[last, x_1, .., x_K]`` in one forward pass over
   positions ``t .. t+K``, where ``last`` is the newest accepted token
   (position ``t``), the only accepted token not yet in the target cache;
3. a verifier (``tokax.decode.verify``) accepts ``n_acc`` drafts and gives
   the next token from the target (correction or bonus);
4. the target cache keeps ``last`` and the accepted drafts
   (``Stream.rollback`` to ``start + n_acc + 1``), the proposer updates
   (rolls back its draft cache, adapts) and observes the pass, and the row
   advances by ``n_acc + 1`` tokens, cut at a stop token or its budget (``loop.emit``).

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

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tokax.decode import loop
from tokax.decode.loop import SpecState, VerifyOutput, buffer_sizes, verify_block_sizes
from tokax.decode.sampling import SamplingParams
from tokax.decode.verify import greedy_accept, greedy_path, verify
from tokax.model.config import ModelConfig
from tokax.model.decoder import Params
from tokax.model.screen import ArgmaxScreen
from tokax.model.stream import Stream


def chain_round(cfg, params, proposer, pparams, s: SpecState, sp: SamplingParams, max_new, eos_ids, verifier,
                verify_sizes: tuple[int, ...] | None = None, screen: ArgmaxScreen | None = None) -> SpecState:
    """One round: propose, verify in one target pass, keep the accepted prefix. With a ``screen``
    (``tokax.model.screen``) a greedy round takes the target's greedy tokens from it instead of
    the float32 logits: the same tokens, cheaper on CPU."""
    K = proposer.k
    rows = s.rows
    B = rows.seq.shape[0]
    d = loop.propose(proposer, params, pparams, s, sp)
    prop, pstate, ctx, live = d.draft, d.pstate, d.ctx, d.live
    n_draft = jnp.where(live, prop.n, 0)

    block = jnp.concatenate([d.last, prop.tokens], axis=1)  # [B, K+1]
    ar = jnp.arange(K + 1, dtype=jnp.int32)[None, :]
    positions = jnp.where(live[:, None], rows.seq_len[:, None] - 1 + ar, -1)
    start = s.cache.length
    (n_acc, nxt), hidden, logits, cache = loop.verify_block(
        cfg, params, s.cache, block, positions, sp=sp, screen=screen, mode=greedy_path(verifier),
        sizes=verify_block_sizes(K, verify_sizes, proposer.can_be_empty),
        need=jnp.max(jnp.where(live, n_draft, 0)) + 1,  # the longest live row's block
        greedy_fn=lambda top: greedy_accept(top, prop.tokens, n_draft),
        verified_fn=lambda lg: verifier(lg, prop.tokens, n_draft, prop.q_logits, sp, d.k_verify),
        keep_logits=proposer.needs_logits)

    # The row's new tokens: the accepted drafts, then the target's token.
    drafts = jnp.concatenate([prop.tokens, jnp.zeros((B, 1), jnp.int32)], axis=1)
    new = jnp.where(ar < n_acc[:, None], drafts, jnp.where(ar == n_acc[:, None], nxt[:, None], 0))
    cache = Stream(cfg, params, cache).rollback(jnp.where(live, start + n_acc + 1, start)).cache
    pstate = proposer.update(pstate, ctx, n_draft, n_acc, live)
    # hidden[b, n_acc[b]] is the target's state after the newest accepted token.
    pstate = proposer.observe(pstate, VerifyOutput(block=block, positions=positions, hidden=hidden, n_acc=n_acc,
                                                   accepted_at=n_acc, live=live, logits=logits))
    return SpecState(rows=loop.emit(rows.replace(rng=d.rng), new, n_acc + 1, max_new, eos_ids), cache=cache,
                     pstate=pstate, stats=loop.count_round(s.stats, live, n_draft, n_acc))


@dataclasses.dataclass(frozen=True)
class ChainRound:
    """The chain loop for ``loop.decode``: the target's cache holds the prompt but its newest
    token, the proposer's state comes from ``init``, then ``chain_round``. ``proposer`` and
    ``verifier`` are static (hashable); ``verify_sizes`` the pass lengths (None: the default)."""

    proposer: Any
    verifier: Callable = verify
    verify_sizes: tuple[int, ...] | None = None

    def init(self, cfg, params, pparams, prompt, prompt_len, max_new, rng, buffer_len: int, screen) -> SpecState:
        self.proposer.check(cfg)
        k = self.proposer.k
        return loop.init_speculation(cfg, params, self.proposer, pparams, prompt, prompt_len, max_new, rng,
                                     buffer_len, width=k, most_accepted=k)

    def step(self, cfg, params, pparams, s: SpecState, sp, max_new, eos_ids, pad_id, screen) -> SpecState:
        return chain_round(cfg, params, self.proposer, pparams, s, sp, max_new, eos_ids, self.verifier,
                           self.verify_sizes, screen)

    def stats(self, s: SpecState) -> loop.RoundStats:
        return s.stats


def speculative_generate(cfg: ModelConfig, params: Params, proposer, pparams: Any, prompt, prompt_len, max_new,
                         sp: SamplingParams, rng, *, buffer_len: int, eos_ids: tuple[int, ...] = (1,), pad_id: int = 0,
                         verifier: Callable = verify, verify_sizes: tuple[int, ...] | None = None,
                         screen: ArgmaxScreen | None = None):
    """Jitted prefill + speculative while loop (``loop.decode`` with ``ChainRound``). Returns
    ``(tokens [B, buffer_len], n_gen [B], RoundStats)``; ``tokens`` past ``n_gen`` are ``pad_id``."""
    return loop.decode(cfg, params, ChainRound(proposer, verifier, verify_sizes), pparams, prompt, prompt_len,
                       max_new, sp, rng, screen, buffer_len=buffer_len, eos_ids=eos_ids, pad_id=pad_id)


def stats_dict(stats: loop.RoundStats, n_gen, row: int) -> dict:
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


class SpeculativeGenerator(loop.FrontEnd):
    """Speculative generation for a target model and a chain proposer, the same front end as
    ``tokax.decode.generate.Generator``: ``generate`` takes strings or token lists and returns
    the generated ids and per-row statistics.

    ``greedy_screen=True`` verifies greedy rounds through a bfloat16 screen of the unembedding
    (``tokax.model.screen``): the same tokens as the float32 logits' argmax at about half the
    cost of a multi-position unembedding on CPU, for 335 MB more memory on Gemma 3 270M
    (float32 params only)."""

    def __init__(self, cfg: ModelConfig, params: Params, proposer, pparams: Any = None, tokenizer=None,
                 eos_ids: Sequence[int] | None = None, pad_id: int | None = None, verifier: Callable = verify,
                 verify_sizes: Sequence[int] | None = None, greedy_screen=False):
        proposer.check(cfg)  # e.g. draft/target vocab mismatch
        self._setup(cfg, params, tokenizer, eos_ids, pad_id, greedy_screen)
        self.proposer, self.pparams, self.verifier = proposer, pparams, verifier
        self.verify_sizes = verify_block_sizes(proposer.k, tuple(verify_sizes) if verify_sizes is not None else None,
                                               proposer.can_be_empty)

    def _slots(self, prompt_bucket: int, buffer_len: int) -> tuple[int, str]:
        return buffer_sizes(prompt_bucket, buffer_len, self.proposer.k)[1], f"k+1={self.proposer.k + 1} draft slots"

    def _limit(self) -> int:
        own = self.proposer.context_limit()
        return self.cfg.max_seq_len if own is None else min(self.cfg.max_seq_len, own)

    def _round(self):
        return ChainRound(self.proposer, self.verifier, self.verify_sizes)

    def _result(self, toks, n, stats):
        stats = jax.device_get(stats)
        return [toks[i, : n[i]].tolist() for i in range(len(n))], [stats_dict(stats, n, i) for i in range(len(n))]
