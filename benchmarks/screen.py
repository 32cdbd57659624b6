"""Cost of the greedy tokens at N positions of Gemma 3 270M: float32 logits +
argmax (what a verify pass computed before) against the bfloat16 screen of
``tokax.model.screen``, on real hidden states.

The hidden states are Gemma's final-normed states over the first 512 tokens
of a Python standard-library module (``--module``, default ``json.decoder``; ``--positions``).
For each N the script times both paths, jitted, on N consecutive positions
(compile excluded, median of ``--reps`` calls), checks that they give the same
tokens, and reports how many tokens the screen had to rescore per position
(its certified candidate set) over all 512 positions.

    python benchmarks/screen.py [--json] [--sizes 1,2,4,6,8,16] [--reps 20] [--plain-loop]

``--plain-loop``: what the screen saves plain greedy decoding (the
speculative benchmark's baseline). It decodes 64 tokens after each of 8
windows of 128 tokens of the module with ``Generator`` (float32
matrix-vector unembedding) and ``Generator(greedy_screen=True)``, and reports
milliseconds per token (prefill included, compile excluded) and whether the
outputs are equal.

``--tiny`` runs on a random Gemma 3 of the same structure and vocabulary, 64
wide and 2 layers deep (``benchmarks/tiny_gemma.py``), not Gemma 3 270M;
``--smoke`` (the smallest run, a check that the script runs) is
``--tiny --sizes 1 --reps 1 --positions 128``.
"""

from __future__ import annotations

import argparse
import inspect
import importlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(f, *a, reps: int) -> float:
    import jax

    jax.block_until_ready(f(*a))  # compile
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*a))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def plain_loop(cfg, params, windows, n_new: int) -> dict:
    """ms per token of plain greedy decoding with ``Generator`` (float32 logits) and with
    ``Generator(greedy_screen=True)``, prefill included, compile excluded."""
    from tokax.decode.generate import Generator

    out = {}
    for name, screen in (("float32", False), ("screen", True)):
        gen = Generator(cfg, params, eos_ids=(), pad_id=0, greedy_screen=screen)
        gen.generate([windows[0]], n_new)  # compile
        t = time.perf_counter()
        out[name] = ([gen.generate([w], n_new)[0] for w in windows], time.perf_counter() - t)
    n_tok = n_new * len(windows)
    return {"float32_ms_per_token": out["float32"][1] / n_tok * 1e3,
            "screen_ms_per_token": out["screen"][1] / n_tok * 1e3,
            "same_tokens": out["float32"][0] == out["screen"][0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--sizes", default="1,2,4,6,8,16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--module", default="json.decoder")
    ap.add_argument("--plain-loop", action="store_true", help="also time plain greedy with and without the screen")
    ap.add_argument("--tiny", action="store_true", help="a random 2-layer Gemma 3 (benchmarks/tiny_gemma.py)")
    ap.add_argument("--positions", type=int, default=512, help="tokens of the module to take hidden states at")
    ap.add_argument("--smoke", action="store_true", help="smallest run: --tiny --sizes 1 --reps 1 --positions 128")
    args = ap.parse_args()
    if args.smoke:
        args.tiny, args.sizes, args.reps, args.positions = True, "1", 1, 128
    if args.positions < 100 + max(int(x) for x in args.sizes.split(",")):
        raise SystemExit("--positions must exceed 100 + the largest of --sizes (the timed positions start at 100)")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from tokax.model.decoder import forward_jit, unembed
    from tokax.model.loaders.gguf import load_gemma3
    from tokax.model.screen import make_argmax_screen, screened_argmax
    from tokax.tokenize import load_gemma3_tokenizer

    if args.tiny:
        import tiny_gemma

        cfg = tiny_gemma.tiny_config()
        params = tiny_gemma.tiny_params(cfg)
    else:
        cfg, params = load_gemma3("float32")
    tok = load_gemma3_tokenizer()
    src = inspect.getsource(importlib.import_module(args.module))
    ids = jnp.asarray([tok.encode(src, add_bos=True)[: args.positions]])
    _, hidden, _ = forward_jit(cfg, params, ids, jnp.arange(ids.shape[1])[None], return_logits=False)
    hidden = hidden[0]  # [T, D]
    E = params["embed"]
    screen = make_argmax_screen(E)

    # The certified candidate set per position (what the screen rescores when it fits in 16).
    h_lo = hidden.astype(jnp.bfloat16)
    h_lo32 = h_lo.astype(jnp.float32)
    a = jnp.einsum("nd,vd->nv", h_lo, screen.embed_lo, preferred_element_type=jnp.float32)
    dh = jnp.linalg.norm(hidden - h_lo32, axis=-1)[:, None]
    nh = jnp.linalg.norm(h_lo32, axis=-1)[:, None]
    b = dh * screen.norm[None] + nh * screen.err[None]
    n_cand = np.asarray(jnp.sum(a + b >= jnp.max(a - b, axis=-1, keepdims=True), axis=-1))
    exact = np.asarray(jnp.argmax(unembed(cfg, params, hidden), -1))
    assert np.all(np.abs(np.asarray(a - unembed(cfg, params, hidden))) <= np.asarray(b)), "bound violated"

    full = jax.jit(lambda h: jnp.argmax(unembed(cfg, params, h), axis=-1))
    scr = jax.jit(lambda s, h: screened_argmax(s, E, h))
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        h = hidden[100:100 + n]
        same = bool(np.array_equal(np.asarray(scr(screen, h)), exact[100:100 + n]))
        rows.append({"positions": n, "float32_ms": timed(full, h, reps=args.reps),
                     "screen_ms": timed(scr, screen, h, reps=args.reps), "same_tokens": same})
    allsame = bool(np.array_equal(np.concatenate([np.asarray(scr(screen, hidden[i:i + 8]))
                                                  for i in range(0, len(exact) - 7, 8)]), exact[:len(exact) // 8 * 8]))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"{'random tiny Gemma 3' if args.tiny else 'Gemma 3 270M'} unembedding ({E.shape[0]} x {E.shape[1]}), "
          f"greedy tokens at N positions, {machine}")
    print(f"{'N':>3} {'float32 ms':>11} {'screen ms':>10} {'ratio':>6} same")
    for r in rows:
        print(f"{r['positions']:>3} {r['float32_ms']:>11.1f} {r['screen_ms']:>10.1f} "
              f"{r['float32_ms'] / r['screen_ms']:>6.2f} {r['same_tokens']}")
    print(f"candidates per position over {len(n_cand)} positions of {args.module}: median {np.median(n_cand):.0f}, "
          f"p99 {np.percentile(n_cand, 99):.0f}, max {n_cand.max()}; screen equals float32 argmax at every "
          f"position: {allsame}")
    loop = None
    if args.plain_loop:
        toks = tok.encode(src, add_bos=True)
        loop = plain_loop(cfg, params, [toks[i * 128:(i + 1) * 128] for i in range(8)], 64)
        print(f"plain greedy, 8 x (128-token window + 64 new tokens): Generator with float32 logits "
              f"{loop['float32_ms_per_token']:.1f} ms/token, Generator(greedy_screen=True) "
              f"{loop['screen_ms_per_token']:.1f} ms/token; same tokens: {loop['same_tokens']}")
    if args.json:
        print(json.dumps({"model": cfg.name, "rows": rows, "candidates": {"median": float(np.median(n_cand)), "max": int(n_cand.max())},
                          "all_positions_equal": allsame, "plain_loop": loop}))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
