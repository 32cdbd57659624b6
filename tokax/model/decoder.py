"""Gemma 3 text decoder as a Flax linen module with an explicit KV cache.

Per layer (Gemma 3):
    h  = x + PostAttnNorm(Attn(PreAttnNorm(x)))
    x' = h + PostFFNNorm(FFN(PreFFNNorm(h)))
with RMSNorm scaling by (1 + w), QK-norm on every head, RoPE (local base on
sliding-window layers, global base on full layers), grouped-query attention,
a GeGLU FFN (tanh GELU), the input embedding scaled by sqrt(d_model) and the
output projection tied to the embedding.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokax.model import kv_cache as kvc
from tokax.model.attention import attend, attend_cache_and_block
from tokax.model.config import ModelConfig

Params = Any


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """Gemma RMSNorm: x / rms(x) * (1 + w), computed in float32."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotary embedding on ``x [B, T, H, Dh]`` at ``positions [B, T]``, rotating
    the two halves of the head dimension against each other."""
    Dh = x.shape[-1]
    half = Dh // 2
    inv_freq = 1.0 / (base ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / Dh))  # [Dh/2]
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    cos = jnp.cos(ang)[:, :, None, :]
    sin = jnp.sin(ang)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


class Block(nn.Module):
    cfg: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x, positions, cache: kvc.KVCache | None, block_mask, block_start, segment_ids=None,
                 write_cache: bool = True):
        cfg = self.cfg
        D, H, KVH, Dh, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
        dt = cfg.jnp_dtype
        zeros = nn.initializers.zeros
        p = lambda name, shape, init: self.param(name, init, shape, dt)  # noqa: E731

        h = rms_norm(x, p("attn_norm", (D,), zeros), cfg.rms_eps)
        q = jnp.einsum("btd,dhk->bthk", h, p("q", (D, H, Dh), _normal(D**-0.5)))
        k = jnp.einsum("btd,dhk->bthk", h, p("k", (D, KVH, Dh), _normal(D**-0.5)))
        v = jnp.einsum("btd,dhk->bthk", h, p("v", (D, KVH, Dh), _normal(D**-0.5)))
        q = rms_norm(q, p("q_norm", (Dh,), zeros), cfg.rms_eps)
        k = rms_norm(k, p("k_norm", (Dh,), zeros), cfg.rms_eps)
        base = cfg.rope_base(self.layer)
        q = rope(q, positions, base)
        k = rope(k, positions, base)

        window = cfg.window(self.layer)
        if cache is None:  # training / scoring: attend within the given tokens
            a = attend(cfg.attention_impl, q, k, v, cfg.attn_scale, positions, positions, window, segment_ids, segment_ids)
        elif not write_cache:  # the cache is read only; the block's K/V go back to the caller
            a = attend_cache_and_block(q, cache.k[self.layer], cache.v[self.layer], cache.pos, k, v, positions,
                                       window, cfg.attn_scale, block_mask)
            cache = (k, v)
        else:
            cache = kvc.write_layer(cache, self.layer, k, v)
            extra = None if block_mask is None else kvc.block_visibility(cache, block_mask, block_start)
            # Cached decoding is not sequence parallel (every device holds the
            # whole cache), so 'ring' configs decode with the reference path.
            impl = "reference" if cfg.attention_impl == "ring" else cfg.attention_impl
            a = attend(impl, q, cache.k[self.layer], cache.v[self.layer], cfg.attn_scale,
                       positions, cache.pos, window, extra_mask=extra)
        a = jnp.einsum("bthk,hkd->btd", a, p("o", (H, Dh, D), _normal((H * Dh) ** -0.5)))
        x = x + rms_norm(a, p("post_attn_norm", (D,), zeros), cfg.rms_eps)

        h = rms_norm(x, p("ffn_norm", (D,), zeros), cfg.rms_eps)
        g = jnp.einsum("btd,df->btf", h, p("gate", (D, F), _normal(D**-0.5)))
        u = jnp.einsum("btd,df->btf", h, p("up", (D, F), _normal(D**-0.5)))
        f = jnp.einsum("btf,fd->btd", jax.nn.gelu(g, approximate=True) * u, p("down", (F, D), _normal(F**-0.5)))
        x = x + rms_norm(f, p("post_ffn_norm", (D,), zeros), cfg.rms_eps)
        return x, cache


class Decoder(nn.Module):
    """``apply(params, tokens, positions, cache=None, block_mask=None,
    return_logits=True, segment_ids=None)`` -> ``(logits, hidden, new_cache)``.

    With ``cache=None`` (training, scoring) the tokens attend only to each
    other (causal by position, within equal ``segment_ids`` when packed) and
    the returned cache is ``None``.

    tokens, positions: ``[B, T]``; a position of -1 marks padding (written to
    the cache as an empty slot, attends to nothing). The ``T`` new tokens are
    written at each row's ``cache.length`` and the length advances by ``T``.
    ``block_mask [B, T, T]`` optionally restricts attention among the new
    tokens (token trees); by default they see each other causally by position.
    ``logits`` is ``None`` when ``return_logits=False``; ``hidden`` is the
    final-normed hidden state ``[B, T, D]`` so callers can unembed only the
    positions they need (``Decoder.unembed``).

    ``write_cache=False`` leaves the cache as it is and returns, in place of the new cache,
    the block's K/V (``kv_cache.BlockKV``): the same attention, computed over the cache plus
    the block (``attention.attend_cache_and_block``); ``kv_cache.write_block`` then gives
    the cache a writing call returns. Verify passes inside ``lax.switch`` use it, so the
    cache is updated in place outside the branches instead of copied through them.
    """

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embed = self.param("embed", _normal(1.0), (cfg.vocab_size, cfg.d_model), cfg.jnp_dtype)
        self.final_norm = self.param("final_norm", nn.initializers.zeros, (cfg.d_model,), cfg.jnp_dtype)
        self.blocks = [Block(cfg, i, name=f"layer_{i}") for i in range(cfg.n_layers)]

    def __call__(self, tokens, positions, cache: kvc.KVCache | None = None, block_mask=None,
                 return_logits: bool = True, segment_ids=None, write_cache: bool = True):
        cfg = self.cfg
        positions = positions.astype(jnp.int32)
        x = jnp.take(self.embed, tokens, axis=0) * jnp.asarray(math.sqrt(cfg.d_model), cfg.jnp_dtype)
        if cache is None:
            if block_mask is not None:
                raise ValueError("block_mask needs a cache (it restricts the block written to it)")
            for blk in self.blocks:
                x, _ = blk(x, positions, None, None, None, segment_ids)
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids are for cache-free (training) calls; pass cache=None")
            if write_cache:
                block_start = cache.length
                cache = kvc.write_positions(cache, positions)
                for blk in self.blocks:
                    x, cache = blk(x, positions, cache, block_mask, block_start)
                cache = kvc.advance(cache, tokens.shape[1])
            else:  # read the cache, return the block's K/V (``kvc.write_block`` stores them)
                ks, vs = [], []
                for blk in self.blocks:
                    x, (k, v) = blk(x, positions, cache, block_mask, None, write_cache=False)
                    ks.append(k)
                    vs.append(v)
                cache = kvc.BlockKV(k=tuple(ks), v=tuple(vs), positions=positions)
        hidden = rms_norm(x, self.final_norm, cfg.rms_eps)
        logits = self.unembed(hidden) if return_logits else None
        return logits, hidden, cache

    def unembed(self, hidden: jax.Array) -> jax.Array:
        """Tied output projection: ``hidden [..., D] @ embed.T`` -> float32 logits."""
        return jnp.einsum("...d,vd->...v", hidden, self.embed, preferred_element_type=jnp.float32)


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Random params for ``cfg`` (norm weights start at 0, i.e. scale 1)."""
    model = Decoder(cfg)
    cache = kvc.init_cache(cfg, 1, 4)
    tok = jnp.zeros((1, 1), jnp.int32)
    return model.init(rng, tok, jnp.zeros((1, 1), jnp.int32), cache)["params"]


def padded_positions(lengths: jax.Array, length: int) -> jax.Array:
    """Positions ``[B, length]`` of right-padded rows with ``lengths [B]`` real tokens:
    ``0 .. n - 1``, then -1 (padding: written as empty slots, attends to nothing)."""
    ar = jnp.arange(length, dtype=jnp.int32)[None]
    return jnp.where(ar < jnp.asarray(lengths)[:, None], ar, -1)


def forward(cfg: ModelConfig, params: Params, tokens, positions, cache=None, block_mask=None, return_logits=True,
            segment_ids=None, write_cache=True):
    """Functional form of ``Decoder(cfg).apply``."""
    return Decoder(cfg).apply({"params": params}, tokens, positions, cache, block_mask, return_logits, segment_ids,
                              write_cache)


def unembed(cfg: ModelConfig, params: Params, hidden: jax.Array) -> jax.Array:
    return Decoder(cfg).apply({"params": params}, hidden, method=Decoder.unembed)


# Jitted ``forward`` (the config is static; one compile per input shape).
forward_jit = jax.jit(forward, static_argnums=(0,), static_argnames=("return_logits", "write_cache"))

