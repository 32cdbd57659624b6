"""What a verify pass of T positions costs, in plain decoding steps, on this machine.

A speculative round on Gemma 3 270M costs one target pass over the round's
drafted positions; plain greedy decoding costs a one-position pass per token.
On an accelerator the two cost about the same for small T; on a CPU the pass
is compute-bound and grows with T, which caps what any draft can return.
This script times, jitted and with compilation excluded, the target's body
plus its greedy tokens through the screen (``tokax.model.screen``, as both
the speculative loops and plain greedy decoding use it) for T = 1 .. 16 new
positions after a 256-token prompt in the cache, interleaving the sizes
(``--reps`` rounds, median), and reports each T's cost over T = 1. It also
times the prompt's prefill per power-of-two bucket (what both sides pay once
per prompt).

    python benchmarks/pass_cost.py [--json] [--sizes 1,2,3,4,6,8,10,12,16] [--reps 12]
    python benchmarks/pass_cost.py --smoke --json   # smallest run (a check that it runs)

``--tiny`` times a random Gemma 3 of the same structure and vocabulary, 64
wide and 2 layers deep (``benchmarks/tiny_gemma.py``), not Gemma 3 270M;
``--smoke`` is ``--tiny --sizes 1,2 --reps 1 --buckets 64``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = 256


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--sizes", default="1,2,3,4,6,8,10,12,16")
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--buckets", default="64,128,256,512")
    ap.add_argument("--tiny", action="store_true", help="a random 2-layer Gemma 3 (benchmarks/tiny_gemma.py)")
    ap.add_argument("--smoke", action="store_true", help="smallest run: --tiny --sizes 1,2 --reps 1 --buckets 64")
    args = ap.parse_args()
    if args.smoke:
        args.tiny, args.sizes, args.reps, args.buckets = True, "1,2", 1, "64"

    import jax
    import jax.numpy as jnp

    from tokax.model import kv_cache as kvc
    from tokax.model.decoder import forward
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
    text = "".join(inspect.getsource(importlib.import_module(m)) for m in ("json.decoder", "json.encoder"))
    ids = jnp.asarray([tok.encode(text, add_bos=True)[:1024]])
    sizes = [int(x) for x in args.sizes.split(",")]
    buckets = [int(x) for x in args.buckets.split(",")]
    screen = make_argmax_screen(params["embed"])

    @jax.jit
    def prefill(params, toks, cache):
        _, h, c = forward(cfg, params, toks, jnp.arange(toks.shape[1])[None], cache, return_logits=False)
        return h[:, -1], c

    @jax.jit
    def verify(params, screen, toks, cache):
        T = toks.shape[1]
        _, h, blk = forward(cfg, params, toks, PROMPT + jnp.arange(T)[None], cache, return_logits=False,
                            write_cache=False)  # as the loops' passes: the cache read, not copied
        return screened_argmax(screen, params["embed"], h), blk

    _, cache = prefill(params, ids[:, :PROMPT], kvc.init_cache(cfg, 1, PROMPT + 128))
    for T in sizes:
        jax.block_until_ready(verify(params, screen, ids[:, PROMPT:PROMPT + T], cache))
    times = {T: [] for T in sizes}
    for _ in range(args.reps):
        for T in sizes:
            t = time.perf_counter()
            jax.block_until_ready(verify(params, screen, ids[:, PROMPT:PROMPT + T], cache))
            times[T].append(time.perf_counter() - t)
    ms = {T: statistics.median(v) * 1e3 for T, v in times.items()}
    pre = {}
    for B in buckets:
        c0 = kvc.init_cache(cfg, 1, B + 128)
        jax.block_until_ready(prefill(params, ids[:, :B], c0))
        v = []
        for _ in range(3):
            t = time.perf_counter()
            jax.block_until_ready(prefill(params, ids[:, :B], c0))
            v.append(time.perf_counter() - t)
        pre[B] = min(v) * 1e3
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"{'random tiny Gemma 3' if args.tiny else 'Gemma 3 270M'} float32, one verify pass (body + greedy tokens through the screen) after a "
          f"{PROMPT}-token prompt, {machine}, median of {args.reps}")
    print(f"{'T':>3} {'ms':>7} {'x step':>7}")
    for T in sizes:
        print(f"{T:>3} {ms[T]:>7.1f} {ms[T] / ms[sizes[0]]:>7.3f}")
    print("prefill: " + ", ".join(f"{B} tokens {pre[B]:.0f} ms" for B in buckets))
    if args.json:
        print(json.dumps({"ms": ms, "relative": {T: ms[T] / ms[sizes[0]] for T in sizes}, "prefill_ms": pre,
                          "model": cfg.name, "machine": machine}))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
