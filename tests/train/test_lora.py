"""LoRA: merge formula, forward of merged weights vs the adapter path, gradients, frozen base."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokax.model import lora as L
from tokax.model.config import tiny
from tokax.model.decoder import forward, init_params
from tokax.train.optim import build_optimizer
from tokax.train.step import StepSpec, init_train_state, make_loss_fn

CFG = tiny(vocab_size=48, n_layers=2)
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
_PARAMS = {}


def _params(seed):
    """Random params, one jitted init for all seeds (compiles are the slow part on CPU)."""
    if seed not in _PARAMS:
        _PARAMS[seed] = _init(jax.random.PRNGKey(seed))
    return _PARAMS[seed]


_init = jax.jit(lambda k: init_params(CFG, k))


def _lora_with_random_b(params, targets, rank, alpha, seed=0):
    lp = L.lora_init(params, targets, rank, alpha, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x, {
        layer: {n: {"a": ab["a"], "b": jnp.asarray(rng.normal(size=ab["b"].shape) * 0.1, jnp.float32)} for n, ab in d.items()}
        for layer, d in lp.items()
    })


def test_init_shapes_and_zero_update():
    params = _params(0)
    lp = L.lora_init(params, TARGETS, rank=3, alpha=6.0, rng=jax.random.PRNGKey(1))
    D, H, KVH, Dh, F = CFG.d_model, CFG.n_heads, CFG.n_kv_heads, CFG.head_dim, CFG.ffn_dim
    assert lp["layer_0"]["q"]["a"].shape == (D, 3) and lp["layer_0"]["q"]["b"].shape == (3, H, Dh)
    assert lp["layer_1"]["k"]["b"].shape == (3, KVH, Dh)
    assert lp["layer_0"]["o"]["a"].shape == (H, Dh, 3) and lp["layer_0"]["o"]["b"].shape == (3, D)
    assert lp["layer_0"]["down"]["a"].shape == (F, 3)
    merged = L.lora_merge(params, lp, 6.0)  # B = 0: exactly the base model
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="choose a non-empty subset"):
        L.lora_init(params, ("q", "wq"), 2, 1.0, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="rank"):
        L.lora_init(params, ("q",), 0, 1.0, jax.random.PRNGKey(0))


def test_merge_equals_base_plus_scaled_product():
    params = _params(0)
    r, alpha = 4, 10.0
    lp = _lora_with_random_b(params, ("q", "o", "gate"), r, alpha)
    merged = L.lora_merge(params, lp, alpha)
    s = alpha / r
    for layer in ("layer_0", "layer_1"):
        a, b = np.asarray(lp[layer]["q"]["a"], np.float64), np.asarray(lp[layer]["q"]["b"], np.float64)
        want = np.asarray(params[layer]["q"], np.float64) + s * np.einsum("dr,rhk->dhk", a, b)
        np.testing.assert_allclose(merged[layer]["q"], want, rtol=1e-5, atol=1e-6)
        a, b = np.asarray(lp[layer]["o"]["a"], np.float64), np.asarray(lp[layer]["o"]["b"], np.float64)
        want = np.asarray(params[layer]["o"], np.float64) + s * np.einsum("hkr,rd->hkd", a, b)
        np.testing.assert_allclose(merged[layer]["o"], want, rtol=1e-5, atol=1e-6)
        a, b = np.asarray(lp[layer]["gate"]["a"], np.float64), np.asarray(lp[layer]["gate"]["b"], np.float64)
        np.testing.assert_allclose(merged[layer]["gate"], np.asarray(params[layer]["gate"]) + s * a @ b, rtol=1e-5, atol=1e-6)
        assert merged[layer]["up"] is params[layer]["up"]  # not a target: untouched
    assert merged["embed"] is params["embed"]


# --- an independent numpy forward that adds the adapter path to each projection's output ---


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (1.0 + w)


def _rope(x, pos, base):
    half = x.shape[-1] // 2
    ang = pos[:, None] * base ** (-np.arange(half) * 2.0 / x.shape[-1])
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    return np.concatenate([x[..., :half] * c - x[..., half:] * s, x[..., half:] * c + x[..., :half] * s], -1)


def _np_forward_with_adapters(cfg, params, lora, alpha, tokens):
    f64 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float64), t)  # noqa: E731
    p, lp = f64(params), f64(lora)
    T = len(tokens)
    pos = np.arange(T, dtype=np.float64)

    def proj(layer, name, x, spec):
        y = np.einsum(spec, x, p[layer][name])
        if name in lp.get(layer, {}):
            a, b = lp[layer][name]["a"], lp[layer][name]["b"]
            r = a.shape[-1]
            n_in = a.ndim - 1
            xa = np.tensordot(x, a, axes=(list(range(x.ndim - n_in, x.ndim)), list(range(n_in))))  # [T, r]
            y = y + (alpha / r) * np.tensordot(xa, b, axes=1)
        return y

    x = p["embed"][np.asarray(tokens)] * math.sqrt(cfg.d_model)
    G = cfg.n_heads // cfg.n_kv_heads
    for i in range(cfg.n_layers):
        ly = f"layer_{i}"
        Lp = p[ly]
        glob = cfg.is_global(i)
        h = _rms(x, Lp["attn_norm"], cfg.rms_eps)
        q = _rope(_rms(proj(ly, "q", h, "td,dhk->thk"), Lp["q_norm"], cfg.rms_eps), pos, cfg.rope_base(i))
        k = _rope(_rms(proj(ly, "k", h, "td,dhk->thk"), Lp["k_norm"], cfg.rms_eps), pos, cfg.rope_base(i))
        v = proj(ly, "v", h, "td,dhk->thk")
        out = np.zeros_like(q)
        for t in range(T):
            lo = 0 if glob else max(0, t - cfg.sliding_window + 1)
            for hd in range(cfg.n_heads):
                s = k[lo : t + 1, hd // G] @ q[t, hd] * cfg.attn_scale
                w = np.exp(s - s.max())
                out[t, hd] = (w / w.sum()) @ v[lo : t + 1, hd // G]
        x = x + _rms(proj(ly, "o", out, "thk,hkd->td"), Lp["post_attn_norm"], cfg.rms_eps)
        h = _rms(x, Lp["ffn_norm"], cfg.rms_eps)
        g = proj(ly, "gate", h, "td,df->tf")
        gelu = 0.5 * g * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g**3)))
        f = proj(ly, "down", gelu * proj(ly, "up", h, "td,df->tf"), "tf,fd->td")
        x = x + _rms(f, Lp["post_ffn_norm"], cfg.rms_eps)
    return _rms(x, p["final_norm"], cfg.rms_eps) @ p["embed"].T


def test_forward_of_merged_equals_forward_with_adapters():
    params = _params(2)
    alpha = 8.0
    lp = _lora_with_random_b(params, TARGETS, 4, alpha, seed=3)
    tokens = np.array([3, 17, 5, 40, 22, 9, 1, 30, 11, 7, 2, 19])
    want = _np_forward_with_adapters(CFG, params, lp, alpha, tokens)
    base_only = _np_forward_with_adapters(CFG, params, {}, alpha, tokens)
    merged = L.lora_merge(params, lp, alpha)
    logits, _, _ = jax.jit(lambda p: forward(CFG, p, tokens[None], np.arange(len(tokens))[None]))(merged)
    got = np.asarray(logits[0], np.float64)
    assert np.max(np.abs(want - base_only)) > 0.1  # the adapters change the output
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_gradient_flows_to_adapters_by_the_chain_rule():
    """dL/dB = (alpha/r) A^T dL/dW and dL/dA = (alpha/r) dL/dW B^T, with dL/dW from the merged model."""
    params = _params(4)
    alpha, r = 6.0, 3
    lp = _lora_with_random_b(params, ("q", "down"), r, alpha, seed=5)
    spec = StepSpec(model=CFG, loss="sft", lora_alpha=alpha)
    loss_fn = make_loss_fn(spec)
    rng = np.random.default_rng(0)
    mb = {"tokens": rng.integers(0, 48, (2, 10)), "targets": rng.integers(0, 48, (2, 10)),
          "positions": np.tile(np.arange(10), (2, 1)), "segment_ids": np.ones((2, 10), np.int32),
          "mask": np.ones((2, 10), np.float32)}
    g_lora = jax.jit(jax.grad(lambda t: loss_fn(t, {"base": params}, mb, {})[0]))(lp)
    full_spec = StepSpec(model=CFG, loss="sft")
    merged = L.lora_merge(params, lp, alpha)
    g_w = jax.jit(jax.grad(lambda p: make_loss_fn(full_spec)(p, {}, mb, {})[0]))(merged)
    s = alpha / r
    for layer in ("layer_0", "layer_1"):
        gq = np.asarray(g_w[layer]["q"], np.float64)  # [D, H, Dh]
        a, b = np.asarray(lp[layer]["q"]["a"], np.float64), np.asarray(lp[layer]["q"]["b"], np.float64)
        np.testing.assert_allclose(g_lora[layer]["q"]["b"], s * np.einsum("dr,dhk->rhk", a, gq), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(g_lora[layer]["q"]["a"], s * np.einsum("dhk,rhk->dr", gq, b), rtol=1e-4, atol=1e-7)
        gd = np.asarray(g_w[layer]["down"], np.float64)
        a, b = np.asarray(lp[layer]["down"]["a"], np.float64), np.asarray(lp[layer]["down"]["b"], np.float64)
        np.testing.assert_allclose(g_lora[layer]["down"]["b"], s * a.T @ gd, rtol=1e-4, atol=1e-7)


def test_lora_train_state_holds_only_adapters():
    params = _params(0)
    lp = L.lora_init(params, ("q", "v"), 2, 4.0, jax.random.PRNGKey(1))
    tx, _ = build_optimizer({"name": "adamw", "lr": 1e-3, "schedule": "constant"}, 10)
    st = init_train_state(StepSpec(model=CFG, loss="dpo", lora_alpha=4.0), lp, tx)
    n_state = sum(x.size for x in jax.tree.leaves(st["opt_state"]) if x.ndim)
    assert n_state == 2 * L.lora_param_count(lp)  # Adam's mu and nu, for the adapters only
    assert L.lora_param_count(lp) < 0.1 * sum(x.size for x in jax.tree.leaves(params))
