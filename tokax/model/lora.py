"""LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models".

A frozen projection W (here a decoder weight with input axes `in` and output
axes `out`, e.g. q: [D] -> [H, Dh]) gets a trainable low-rank update

    W' = W + (alpha / r) * A @ B,      A: [*in, r],  B: [r, *out],

with A ~ N(0, 1/d_in) and B = 0 at the start, so W' = W before training
(eq. 3-4 of the paper, with their B/A named A/B here in input -> output
order). Because the update is linear in the weight, running the model on the
merged weights W' equals running it with the adapter path added to each
projection's output, y = x W + (alpha / r) (x A) B; the train step therefore
differentiates only the adapter tree and merges inside the loss function
(cheap for a 270M model: one [D, r] x [r, F] product per projection).

The adapter tree mirrors the params tree: ``{'layer_i': {'q': {'a', 'b'}, ...}}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["PROJECTIONS", "lora_init", "lora_merge", "lora_delta", "lora_param_count"]

# Input-axis count of each projection (the rest of its axes are outputs).
PROJECTIONS: dict[str, int] = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}

Params = Any


def _check_targets(targets: Sequence[str]) -> tuple[str, ...]:
    targets = tuple(targets)
    bad = [t for t in targets if t not in PROJECTIONS]
    if bad or not targets:
        raise ValueError(f"LoRA targets {list(targets)}: choose a non-empty subset of {list(PROJECTIONS)}")
    return targets


def lora_init(params: Params, targets: Sequence[str], rank: int, alpha: float, rng: jax.Array) -> Params:
    """Adapters for every layer's projections named in ``targets``.

    A: [*in, r] ~ N(0, 1 / prod(in)) (float32), B: [r, *out] = 0, so the
    merged model starts equal to the base model. ``alpha`` is only checked
    here (it scales the update in ``lora_merge``), so that a bad value fails
    before any training.
    """
    targets = _check_targets(targets)
    if int(rank) < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if not float(alpha) > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
    layers = sorted((k for k in params if k.startswith("layer_")), key=lambda k: int(k.split("_")[1]))
    if not layers:
        raise ValueError("lora_init: params have no 'layer_i' entries")
    out: dict[str, Any] = {}
    keys = jax.random.split(rng, len(layers) * len(targets))
    i = 0
    for layer in layers:
        lp = {}
        for name in targets:
            w = params[layer][name]
            n_in = PROJECTIONS[name]
            in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
            fan_in = 1
            for d in in_shape:
                fan_in *= d
            a = jax.random.normal(keys[i], (*in_shape, rank), jnp.float32) * fan_in**-0.5
            b = jnp.zeros((rank, *out_shape), jnp.float32)
            lp[name] = {"a": a, "b": b}
            i += 1
        out[layer] = lp
    return out


def lora_delta(a: jax.Array, b: jax.Array, alpha: float) -> jax.Array:
    """(alpha / r) * A @ B contracted over the rank: [*in, r] x [r, *out] -> [*in, *out] (float32)."""
    r = a.shape[-1]
    if b.shape[0] != r:
        raise ValueError(f"LoRA A {a.shape} and B {b.shape} disagree on the rank")
    return (alpha / r) * jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)


def lora_merge(params: Params, lora_params: Params, alpha: float) -> Params:
    """Params with every adapted projection replaced by W + (alpha / r) A @ B.

    The sum is formed in float32 and cast to W's dtype; un-adapted params are
    returned as they are (same objects), so merging is cheap to trace.
    """
    merged = dict(params)
    for layer, adapters in lora_params.items():
        if layer not in params:
            raise ValueError(f"lora_merge: adapter for {layer!r} but params have no such layer")
        lp = dict(params[layer])
        for name, ab in adapters.items():
            w = lp[name]
            d = lora_delta(ab["a"], ab["b"], alpha)
            if d.shape != w.shape:
                raise ValueError(f"lora_merge: {layer}/{name} adapter gives {d.shape}, weight is {w.shape}")
            lp[name] = (w.astype(jnp.float32) + d).astype(w.dtype)
        merged[layer] = lp
    return merged


def lora_param_count(lora_params: Params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(lora_params)))


def check_lora_tree(lora_params: Mapping[str, Any]) -> None:
    """Raise if the tree is not ``{'layer_i': {proj: {'a', 'b'}}}``."""
    for layer, adapters in lora_params.items():
        for name, ab in adapters.items():
            if name not in PROJECTIONS or set(ab) != {"a", "b"}:
                raise ValueError(f"not a LoRA tree at {layer}/{name}: {sorted(ab) if isinstance(ab, Mapping) else ab}")
