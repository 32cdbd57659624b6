"""Model configuration: one frozen dataclass for every decoder tokax builds."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

AttentionImpl = Literal["reference", "flash", "ring"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Gemma 3 style decoder hyperparameters.

    Layer ``i`` is a global (full causal attention) layer when
    ``(i + 1) % sliding_window_pattern == 0`` and a local sliding-window layer
    otherwise, as in Gemma 3 (5 local : 1 global). Local layers see keys at
    positions ``j`` with ``i - sliding_window < j <= i`` and use RoPE base
    ``rope_base_local``; global layers use ``rope_base_global``.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    sliding_window: int | None = 512
    sliding_window_pattern: int = 6
    rope_base_global: float = 1_000_000.0
    rope_base_local: float = 10_000.0
    rms_eps: float = 1e-6
    query_pre_attn_scalar: float | None = None  # None: head_dim
    dtype: str = "float32"  # params and activations; norms/softmax run in float32
    attention_impl: AttentionImpl = "reference"
    max_seq_len: int = 32768
    name: str = "custom"

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"ModelConfig.dtype={self.dtype!r}: use 'float32' or 'bfloat16'")
        if self.attention_impl not in ("reference", "flash", "ring"):
            raise ValueError(
                f"ModelConfig.attention_impl={self.attention_impl!r}: use 'reference', 'flash' or 'ring'"
            )

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def attn_scale(self) -> float:
        s = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim
        return float(s) ** -0.5

    def is_global(self, layer: int) -> bool:
        if self.sliding_window is None:
            return True
        return (layer + 1) % self.sliding_window_pattern == 0

    def window(self, layer: int) -> int | None:
        return None if self.is_global(layer) else self.sliding_window

    def rope_base(self, layer: int) -> float:
        return self.rope_base_global if self.is_global(layer) else self.rope_base_local

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


def gemma3_270m(dtype: str = "float32", **kw) -> ModelConfig:
    """Gemma 3 270M (text). Values not stored in the GGUF (local RoPE base,
    5:1 layer pattern, query scalar) are Gemma 3's published ones."""
    base = dict(
        vocab_size=262_144,
        d_model=640,
        n_layers=18,
        n_heads=4,
        n_kv_heads=1,
        head_dim=256,
        ffn_dim=2048,
        sliding_window=512,
        sliding_window_pattern=6,
        rope_base_global=1_000_000.0,
        rope_base_local=10_000.0,
        rms_eps=1e-6,
        query_pre_attn_scalar=256.0,
        dtype=dtype,
        max_seq_len=32768,
        name="gemma3-270m",
    )
    base.update(kw)
    return ModelConfig(**base)


def tiny(vocab_size: int = 64, **kw) -> ModelConfig:
    """A random tiny decoder for tests: GQA (4 query heads on 2 KV heads),
    a local layer with a short window and a global layer."""
    base = dict(
        vocab_size=vocab_size,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        ffn_dim=64,
        sliding_window=8,
        sliding_window_pattern=2,
        rope_base_global=10_000.0,
        rope_base_local=100.0,
        max_seq_len=4096,
        name="tiny",
    )
    base.update(kw)
    return ModelConfig(**base)


PRESETS = {"gemma3-270m": gemma3_270m, "tiny": tiny}
