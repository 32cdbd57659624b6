"""A random Gemma 3 decoder small enough for the benchmarks' smoke modes (``--tiny``).

It keeps Gemma 3 270M's vocabulary (262,144 tokens, so the real tokenizer
serves both sides) and its layer structure (a sliding-window layer, then a
global one; q/k norms; GeGLU; four norms per block; tied head), at a width
that trains and decodes in a second or two on a CPU. ``tiny_params`` draws
the weights from a seed, so two processes build the same model; ``to_hf``
turns them into an HF ``Gemma3ForCausalLM`` with the same weights.

Numbers measured on this model say that a benchmark's code runs end to end,
both sides; they are not the benchmark's result.
"""

from __future__ import annotations

import numpy as np

SEED = 0


def tiny_config():
    from tokax.model.config import gemma3_270m

    return gemma3_270m(
        "float32", d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, ffn_dim=128,
        sliding_window_pattern=2, query_pre_attn_scalar=32.0, max_seq_len=4096, name="gemma3-tiny-random",
    )


def tiny_params(cfg, seed: int = SEED):
    """tokax params for ``cfg``: ``init_params`` with the norm weights moved off zero, so that
    every weight, the ``1 + w`` norm scales included, differs between positions and layers."""
    import jax

    from tokax.model.decoder import init_params

    def draw(key):
        params = init_params(cfg, key)
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
        leaves = [a + 0.1 * jax.random.normal(k, a.shape, a.dtype) if a.ndim == 1 else a for a, k in zip(leaves, keys)]
        return jax.tree.unflatten(tree, leaves)

    return jax.jit(draw)(jax.random.PRNGKey(seed))  # one compile, not one per initializer


def hf_config(cfg):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.rms_eps,
        query_pre_attn_scalar=int(cfg.query_pre_attn_scalar or cfg.head_dim), sliding_window=cfg.sliding_window,
        layer_types=["full_attention" if cfg.is_global(i) else "sliding_attention" for i in range(cfg.n_layers)],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": cfg.rope_base_global},
                         "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_base_local}},
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )


def to_hf(cfg, params):
    """An HF ``Gemma3ForCausalLM`` (float32, eval mode) holding ``params``. tokax keeps the
    projections as ``[in, heads, head_dim]`` / ``[in, out]`` and the norms as ``w`` of the
    applied ``1 + w``, which is also what HF's Gemma RMSNorm stores."""
    import torch
    from transformers import Gemma3ForCausalLM

    D = cfg.d_model
    arr = lambda x: torch.from_numpy(np.array(x, np.float32))  # noqa: E731  (a writable copy)
    sd = {"model.embed_tokens.weight": arr(params["embed"]), "model.norm.weight": arr(params["final_norm"])}
    for i in range(cfg.n_layers):
        p, pre = params[f"layer_{i}"], f"model.layers.{i}."
        sd[pre + "self_attn.q_proj.weight"] = arr(np.asarray(p["q"]).reshape(D, -1).T)
        sd[pre + "self_attn.k_proj.weight"] = arr(np.asarray(p["k"]).reshape(D, -1).T)
        sd[pre + "self_attn.v_proj.weight"] = arr(np.asarray(p["v"]).reshape(D, -1).T)
        sd[pre + "self_attn.o_proj.weight"] = arr(np.asarray(p["o"]).reshape(-1, D).T)
        for ours, theirs in (("q_norm", "self_attn.q_norm"), ("k_norm", "self_attn.k_norm"),
                             ("attn_norm", "input_layernorm"), ("post_attn_norm", "post_attention_layernorm"),
                             ("ffn_norm", "pre_feedforward_layernorm"), ("post_ffn_norm", "post_feedforward_layernorm")):
            sd[pre + theirs + ".weight"] = arr(p[ours])
        for ours, theirs in (("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"), ("down", "mlp.down_proj")):
            sd[pre + theirs + ".weight"] = arr(np.asarray(p[ours]).T)
    model = Gemma3ForCausalLM(hf_config(cfg)).to(torch.float32).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise ValueError(f"tiny Gemma -> HF: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model
