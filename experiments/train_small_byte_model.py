"""Build the small model of the byte-level ensemble: a 4096-piece BPE and a small decoder, both on stdlib code.

    python experiments/train_small_byte_model.py [--out ~/.cache/tokax/small_byte_model] [--steps N]

1. Trains a byte-fallback sentencepiece BPE (4096 pieces, identity
   normalization, no dummy prefix: `tokax.tokenize.train_code_tokenizer`)
   on the stdlib's *train* files (`tokax.data.stdlib.stdlib_files("train")`,
   the path-hash split), saved as ``OUT/stdlib_bpe_4096.model``.
2. Trains a small tokax decoder with that vocabulary by SFT (next-token NLL,
   `tokax.train.trainer.run`, config `configs/byte_ensemble.py`), then writes
   ``OUT/params.npz`` (flat "a/b/c" keys) and ``OUT/model.json`` (the
   `ModelConfig` fields, the split, the final metrics).

Held out: the stdlib's *eval* split (about 5% of the files, disjoint from
the tokenizer's and the model's training files) is what the benchmark's
bits/byte are measured on. Deterministic for a given Python build.
``load(OUT)`` returns ``(cfg, params, vocab)`` for `tokax.decode.byte_level.ByteLM`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _config_module():
    spec = importlib.util.spec_from_file_location("_byte_ensemble_config", ROOT / "configs" / "byte_ensemble.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _flatten(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = np.asarray(v)
    return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def load(out_dir: str | os.PathLike[str] | None = None):
    """``(cfg, params, vocab)`` of a model written by this script (a `ByteVocab` over its BPE)."""
    import jax.numpy as jnp

    from tokax.model.config import ModelConfig
    from tokax.tokenize.byte_vocab import ByteVocab

    d = Path(os.path.expanduser(str(out_dir or _config_module().DEFAULT_DIR)))
    meta_path = d / "model.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} not found; build it with: python experiments/train_small_byte_model.py --out {d}")
    meta = json.loads(meta_path.read_text())
    fields = dict(meta["model_config"])
    cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    with np.load(d / "params.npz") as z:
        params = _unflatten({k: jnp.asarray(z[k]) for k in z.files})
    vocab = ByteVocab((d / meta["tokenizer"]).read_bytes())
    return cfg, params, vocab


def export(c, out: str, vocab_size: int, metrics: dict, seconds: float) -> None:
    """Write ``out/params.npz`` and ``out/model.json`` from the latest checkpoint of the run `c`."""
    import jax

    from tokax.model.decoder import init_params
    from tokax.train import trainer
    from tokax.train.checkpoint import restore_params

    cfg = trainer._model_config(c.model, vocab_size)
    shapes = jax.eval_shape(lambda r: init_params(cfg, r), jax.random.PRNGKey(0))
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), shapes)
    params, ck_meta = restore_params(os.path.join(c.workdir, "checkpoints"), abstract)
    np.savez(os.path.join(out, "params.npz"), **_flatten(jax.device_get(params)))
    meta = {
        "model_config": dataclasses.asdict(cfg),
        "tokenizer": f"stdlib_bpe_{int(c.data.vocab_size)}.model",
        "step": ck_meta.get("step"),
        "train_split": "tokax.data.stdlib.stdlib_files('train')",
        "heldout_split": "tokax.data.stdlib.stdlib_files('eval')",
        "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        "python": sys.version.split()[0],
        "seconds": round(seconds, 1),
    }
    with open(os.path.join(out, "model.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"[small] wrote {out}/params.npz and model.json (step {meta['step']})", flush=True)


def main() -> None:
    mod = _config_module()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=mod.DEFAULT_DIR, help="output folder (default %(default)s)")
    ap.add_argument("--steps", type=int, default=0, help="override total_steps (0: the config's)")
    ap.add_argument("--export-only", action="store_true", help="only write params.npz from the latest checkpoint")
    args = ap.parse_args()
    out = os.path.abspath(os.path.expanduser(args.out))
    os.makedirs(out, exist_ok=True)

    from tokax.train import data as data_lib
    from tokax.train import trainer

    c = mod.train_config(out)
    if args.steps:
        c.total_steps = args.steps
    t0 = time.time()
    tok = data_lib.get_tokenizer("spm", int(c.data.vocab_size), out)  # trains and caches the BPE once
    print(f"[small] tokenizer {out}/stdlib_bpe_{int(c.data.vocab_size)}.model: {tok.vocab_size} pieces "
          f"({time.time() - t0:.0f}s)", flush=True)
    metrics: dict = {}
    if not args.export_only:
        metrics = trainer.run(c)
        print(f"[small] trained {c.total_steps} steps in {time.time() - t0:.0f}s: "
              + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if isinstance(v, float)), flush=True)
    export(c, out, tok.vocab_size, metrics, time.time() - t0)


if __name__ == "__main__":
    main()
