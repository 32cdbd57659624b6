"""A ``Stream``: one model (config + params) and the KV cache of the rows it is reading.

Every decoding method that runs a model with its own cache (the target of a
speculative loop, a draft model, and next a guidance stream or a scorer)
goes through this one value instead of calling ``forward`` and the
``kv_cache`` functions by hand:

    s = Stream(cfg, params, cache)
    s = s.prefill(prompt, n)                       # write prompt[:, :n] (n [B] per row)
    logits, hidden, s = s.extend(tokens, positions)  # a pass that writes its K/V
    logits, hidden, blk = s.score(tokens, positions, block_mask)  # a pass that only reads
    s = s.commit(blk)                              # ... and stores its block later
    s = s.rollback(length) / s.compact(start, keep, n_keep) / s.take_rows(idx)

A stream is a pytree (the config is static), so it can be built inside a
jitted step from the step's params and the cache the loop carries; the loops
carry only ``stream.cache``, never the params. ``params`` may carry a head
over a token subset (``tokax.model.heads.subset_head_params``): ``extend``,
``score`` and ``logits`` then give ``NEG_LOGIT`` outside the subset.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import struct

from tokax.model import kv_cache as kvc
from tokax.model.config import ModelConfig
from tokax.model.decoder import forward, padded_positions, unembed
from tokax.model.heads import decoder_of, is_subset_head, subset_logits

__all__ = ["Stream", "head_logits"]


def head_logits(cfg: ModelConfig, params: Any, hidden: jax.Array) -> jax.Array:
    """Logits ``[..., V]`` float32 from final-normed ``hidden [..., D]``, with the tied head or
    the subset head ``params`` carries."""
    if is_subset_head(params):
        return subset_logits(params, hidden, cfg.vocab_size)
    return unembed(cfg, params, hidden)


@struct.dataclass
class Stream:
    cfg: ModelConfig = struct.field(pytree_node=False)
    params: Any
    cache: kvc.KVCache | None = None

    @classmethod
    def empty(cls, cfg: ModelConfig, params: Any, batch: int, slots: int) -> "Stream":
        """A stream with an empty cache of ``slots`` slots per row."""
        return cls(cfg, params, kvc.init_cache(cfg, batch, slots))

    # ---------------------------------------------------------------- passes
    def logits(self, hidden: jax.Array) -> jax.Array:
        return head_logits(self.cfg, self.params, hidden)

    def _forward(self, tokens, positions, block_mask, write_cache: bool):
        return forward(self.cfg, decoder_of(self.params), tokens, positions, self.cache, block_mask,
                       return_logits=False, write_cache=write_cache)

    def extend(self, tokens: jax.Array, positions: jax.Array, block_mask: jax.Array | None = None,
               logits: bool = True) -> tuple[jax.Array | None, jax.Array, "Stream"]:
        """Run ``tokens [B, T]`` at ``positions [B, T]`` (-1: padding) and write their K/V:
        ``(logits [B, T, V] or None, hidden [B, T, D], the stream with the new cache)``."""
        _, hidden, cache = self._forward(tokens, positions, block_mask, True)
        return (self.logits(hidden) if logits else None), hidden, self.replace(cache=cache)

    def score(self, tokens: jax.Array, positions: jax.Array, block_mask: jax.Array | None = None,
              logits: bool = True) -> tuple[jax.Array | None, jax.Array, kvc.BlockKV]:
        """The same pass reading the cache only: ``(logits or None, hidden, BlockKV)``; store the
        block with ``commit`` (outside any ``lax.cond`` / ``switch``, so the update is in place)."""
        _, hidden, blk = self._forward(tokens, positions, block_mask, False)
        return (self.logits(hidden) if logits else None), hidden, blk

    def prefill(self, prompt: jax.Array, n: jax.Array) -> "Stream":
        """Write the first ``n[b]`` tokens of each row of ``prompt [B, P]`` (the rest as empty slots)."""
        _, _, s = self.extend(prompt, padded_positions(n, prompt.shape[1]), logits=False)
        return s

    # ----------------------------------------------------------- the cache
    def commit(self, blk: kvc.BlockKV) -> "Stream":
        return self.replace(cache=kvc.write_block(self.cache, blk))

    def rollback(self, length: jax.Array) -> "Stream":
        return self.replace(cache=kvc.rollback(self.cache, length))

    def compact(self, start: jax.Array, keep: jax.Array, n_keep: jax.Array) -> "Stream":
        return self.replace(cache=kvc.compact(self.cache, start, keep, n_keep))

    def take_rows(self, idx: jax.Array) -> "Stream":
        """The rows ``idx [B']`` of the cache, in that order (beams, forks of candidates)."""
        return self.replace(cache=kvc.take_rows(self.cache, idx))

    @property
    def length(self) -> jax.Array:
        return self.cache.length
