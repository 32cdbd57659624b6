"""An independent numpy Gemma 3 forward pass: the oracle for the decoder tests.

Written from the architecture description (not from tokax.model): full
sequence, no cache, per-query explicit loops for the windowed causal mask.
"""

import math

import numpy as np


def _rms(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (1.0 + w)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _rope(x, pos, base):  # x [T, H, Dh]
    Dh = x.shape[-1]
    half = Dh // 2
    freq = base ** (-np.arange(half) * 2.0 / Dh)
    ang = pos[:, None] * freq[None, :]  # [T, half]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * c - b * s, b * c + a * s], -1)


def forward(cfg, params, tokens):
    """Logits [T, V] (float64) for one sequence of token ids at positions 0..T-1."""
    p = {k: (np.asarray(v, np.float64) if not isinstance(v, dict) else {kk: np.asarray(vv, np.float64) for kk, vv in v.items()}) for k, v in params.items()}
    T = len(tokens)
    pos = np.arange(T, dtype=np.float64)
    x = p["embed"][np.asarray(tokens)] * math.sqrt(cfg.d_model)
    G = cfg.n_heads // cfg.n_kv_heads
    scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
    for i in range(cfg.n_layers):
        L = p[f"layer_{i}"]
        is_global = cfg.sliding_window is None or (i + 1) % cfg.sliding_window_pattern == 0
        base = cfg.rope_base_global if is_global else cfg.rope_base_local
        h = _rms(x, L["attn_norm"], cfg.rms_eps)
        q = np.einsum("td,dhk->thk", h, L["q"])
        k = np.einsum("td,dhk->thk", h, L["k"])
        v = np.einsum("td,dhk->thk", h, L["v"])
        q = _rope(_rms(q, L["q_norm"], cfg.rms_eps), pos, base)
        k = _rope(_rms(k, L["k_norm"], cfg.rms_eps), pos, base)
        out = np.zeros_like(q)
        for t in range(T):
            lo = 0 if is_global else max(0, t - cfg.sliding_window + 1)
            for hd in range(cfg.n_heads):
                kv = hd // G
                s = k[lo : t + 1, kv] @ q[t, hd] * scale
                w = np.exp(s - s.max())
                w /= w.sum()
                out[t, hd] = w @ v[lo : t + 1, kv]
        a = np.einsum("thk,hkd->td", out, L["o"])
        x = x + _rms(a, L["post_attn_norm"], cfg.rms_eps)
        h = _rms(x, L["ffn_norm"], cfg.rms_eps)
        f = (_gelu_tanh(h @ L["gate"]) * (h @ L["up"])) @ L["down"]
        x = x + _rms(f, L["post_ffn_norm"], cfg.rms_eps)
    x = _rms(x, p["final_norm"], cfg.rms_eps)
    return x @ p["embed"].T
