"""Speculative decoding speed: every tokax method vs tokax plain greedy, with
HF transformers' plain greedy and prompt lookup decoding in the same run.

Target: Gemma 3 270M (the GGUF dequantized to float32) for both tokax and HF.
Three prompt sets of real text, ``--n-prompts`` each (default 20):

* ``code``: prefixes of Python standard-library functions (signature,
  docstring and the first lines of the body, from ``inspect.getsource``);
* ``rewrite``: paragraphs of the Python reference manual
  (``pydoc_data.topics``) with a repeat / rewrite / extract instruction;
* ``prose``: the opening sentences of other such paragraphs, to continue.

Every prompt is decoded greedily at batch 1 for exactly ``--new-tokens``
tokens (no stop token), after one warm-up call per method that compiles it.
Reported per set and method: wall-clock speedup over tokax plain greedy,
mean accepted draft tokens per target pass, tokens per target pass, and
whether the output equals plain greedy token for token. HF: plain
``generate`` and ``generate(prompt_lookup_num_tokens=K)``;
``hf_prompt_lookup_speedup`` is HF prompt lookup over HF plain greedy (each
framework against its own baseline).

    python benchmarks/speculative.py [--json] [--new-tokens 64] [--n-prompts 20] \
        [--methods prompt_lookup,anpd,draft,kangaroo,specdec_pp] [--k 5] [--no-hf]

With ``--json`` the last line maps each set to ``{"best_method",
"best_speedup", "hf_prompt_lookup_speedup"}``. Untrained drafts: ``draft``
and ``specdec_pp`` use the target's first ``--draft-layers`` layers + LM head,
``kangaroo`` an identity adapter (plain early exit); expect low acceptance
from them until distilled drafts exist.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CODE_FUNCS = [
    "textwrap.dedent", "textwrap.indent", "posixpath.join", "posixpath.splitext", "posixpath.relpath",
    "shutil.copyfileobj", "shutil.which", "json.dumps", "json.loads", "heapq.nsmallest", "heapq.merge",
    "bisect.insort_right", "functools.total_ordering", "string.capwords", "fnmatch.translate",
    "os.makedirs", "os.walk", "random.Random.shuffle", "random.Random.choices", "statistics.median",
    "statistics.mode", "base64.b64encode", "glob.glob", "csv.DictReader.__next__", "calendar.isleap",
    "difflib.get_close_matches", "ipaddress.ip_address", "urllib.parse.urljoin", "colorsys.rgb_to_hsv",
    "textwrap.shorten",
]
REWRITE_TEMPLATES = [
    "Repeat the following passage exactly.\n\nPassage:\n{p}\n\nRepeated passage:\n",
    "Rewrite the following passage in plain English, keeping all technical terms.\n\nPassage:\n{p}\n\nRewritten:\n",
    "Copy every sentence of the passage below that contains a quoted keyword.\n\nPassage:\n{p}\n\nSentences:\n",
]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def code_prompts(n: int) -> list[str]:
    import importlib

    out = []
    for name in CODE_FUNCS:
        mod_name, *attrs = name.split(".")
        obj = importlib.import_module(mod_name)
        for i, a in enumerate(attrs):
            try:
                obj = getattr(obj, a)
            except AttributeError:  # dotted module path (os.path style)
                obj = importlib.import_module(".".join([mod_name] + attrs[: i + 1]))
        try:
            lines = inspect.getsource(obj).splitlines(keepends=True)
        except (OSError, TypeError):
            continue
        cut = max(3, len(lines) // 3)  # signature, docstring head, first lines of the body
        out.append("".join(lines[: min(cut, 25)]))
        if len(out) == n:
            break
    return out


def paragraphs() -> list[str]:
    import pydoc_data.topics as topics

    paras = []
    for key in sorted(topics.topics):
        for para in topics.topics[key].split("\n\n"):
            if para[:1].isalpha() and len(para) > 300 and "::=" not in para and "***" not in para:
                paras.append(" ".join(para.split()))
    return paras


def rewrite_prompts(n: int) -> list[str]:
    paras = paragraphs()[::2]
    return [REWRITE_TEMPLATES[i % len(REWRITE_TEMPLATES)].format(p=p[:700]) for i, p in enumerate(paras[:n])]


def prose_prompts(n: int) -> list[str]:
    out = []
    for p in paragraphs()[1::2]:
        sentences = re.split(r"(?<=[.!?])\s+", p)
        out.append(" ".join(sentences[:2]) + " ")
        if len(out) == n:
            break
    return out


def time_calls(fn, prompts) -> tuple[float, list]:
    outs, dt = [], 0.0
    for p in prompts:
        t = time.perf_counter()
        outs.append(fn(p))
        dt += time.perf_counter() - t
    return dt, outs


def bench_tokax(sets: dict, args) -> dict:
    import configs.speculative as spec_config
    from tokax.decode.generate import Generator, bucket
    from tokax.decode.speculative import SpeculativeGenerator
    from tokax.jobs.speculative import build_proposer
    from tokax.model.loaders.gguf import load_gemma3
    from tokax.tokenize import load_gemma3_tokenizer

    cfg, params = load_gemma3("float32")
    tok = load_gemma3_tokenizer()
    N = args.new_tokens
    res = {}
    for name, prompts in sets.items():
        ids = [tok.encode(p, add_bos=True) for p in prompts]
        pad_to = bucket(max(len(x) for x in ids))  # one compiled program per set and method
        plain = Generator(cfg, params, eos_ids=(), pad_id=0)
        plain.generate([ids[0]], N, pad_to=pad_to)  # compile
        t_plain, ref = time_calls(lambda x: plain.generate([x], N, pad_to=pad_to)[0], ids)
        log(f"[{name}] tokax plain greedy: {len(ids) * N / t_plain:.1f} tok/s")
        rows = {"plain": {"seconds": t_plain, "tok_s": len(ids) * N / t_plain}}
        for method in args.methods:
            c = spec_config.get_config(method)
            c.k, c.draft_layers, c.seed = args.k, args.draft_layers, 0
            if method == "blockwise" and args.blockwise_heads:
                c.blockwise_heads = args.blockwise_heads
            prop, pparams = build_proposer(c, cfg, params)
            gen = SpeculativeGenerator(cfg, params, prop, pparams, eos_ids=(), pad_id=0)
            gen.generate([ids[0]], N, pad_to=pad_to)  # compile
            dt, outs = time_calls(lambda x: gen.generate([x], N, pad_to=pad_to), ids)
            stats = [o[1][0] for o in outs]
            acc, passes = sum(s["accepted"] for s in stats), sum(s["target_passes"] for s in stats)
            rows[method] = {
                "seconds": dt,
                "speedup": t_plain / dt,
                "mean_accepted_per_pass": acc / passes,
                "tokens_per_pass": sum(s["new_tokens"] for s in stats) / passes,
                "identical_to_plain": sum(o[0][0] == r for o, r in zip(outs, ref)),
            }
            log(f"[{name}] {method}: {rows[method]}")
        res[name] = rows
    return res


def bench_hf(sets: dict, args) -> dict:
    import torch

    from tests.model.hf_reference import load_hf

    torch.set_num_threads(os.cpu_count())
    tok, model = load_hf()
    N = args.new_tokens

    def gen(p, **kw):
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False, **kw)

    res = {}
    for name, prompts in sets.items():
        gen(prompts[0])
        gen(prompts[0], prompt_lookup_num_tokens=args.k)  # warm-up
        t_plain, _ = time_calls(gen, prompts)
        t_pl, _ = time_calls(lambda p: gen(p, prompt_lookup_num_tokens=args.k), prompts)
        res[name] = {"plain_seconds": t_plain, "prompt_lookup_seconds": t_pl, "prompt_lookup_speedup": t_plain / t_pl}
        log(f"[{name}] HF: {res[name]}")
    return res


def plot(tk: dict, hf: dict, methods: list, path: str, title: str) -> None:
    """Grouped bars: wall-clock speedup over each tool's own plain greedy, per prompt set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sets = list(tk)
    bars = [(m, [tk[s][m]["speedup"] for s in sets]) for m in methods]
    if hf:
        bars.append(("HF prompt lookup", [hf[s]["prompt_lookup_speedup"] if s in hf else np.nan for s in sets]))
    w = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (name, ys) in enumerate(bars):
        xs = np.arange(len(sets)) + (i - (len(bars) - 1) / 2) * w
        ax.bar(xs, ys, w, label=name)
        for x, y in zip(xs, ys):
            ax.text(x, y + 0.02, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(2.0, color="tab:red", lw=0.8, ls="--", label="target 2x (code, rewrite)")
    top = np.nanmax([y for _, ys in bars for y in ys] + [2.0])
    ax.set_ylim(0, top + 0.6)  # room for the legend above the bars
    ax.set_xticks(np.arange(len(sets)), sets)
    ax.set_ylabel("speedup over own plain greedy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--n-prompts", type=int, default=20)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--draft-layers", type=int, default=4)
    ap.add_argument("--methods", default="prompt_lookup,anpd,draft,kangaroo,specdec_pp")
    ap.add_argument("--sets", default="code,rewrite,prose")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--plot", default="", help="write a speedup bar chart (PNG) here")
    ap.add_argument("--results", default="", help="write every number (tokax and HF) to this JSON file")
    ap.add_argument("--blockwise-heads", default="", help=".npz of trained heads (experiments/train_gemma_heads.py)")
    args = ap.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    makers = {"code": code_prompts, "rewrite": rewrite_prompts, "prose": prose_prompts}
    sets = {s: makers[s](args.n_prompts) for s in args.sets.split(",")}
    for s, ps in sets.items():
        if len(ps) < args.n_prompts:
            raise SystemExit(f"prompt set {s!r} has only {len(ps)} prompts (< --n-prompts {args.n_prompts})")

    tk = bench_tokax(sets, args)
    hf = {} if args.no_hf else bench_hf(sets, args)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"\nGemma 3 270M float32, greedy, batch 1, {args.new_tokens} new tokens, K={args.k}, {machine}")
    print(f"{'set':<8} {'method':<14} {'speedup':>8} {'acc/pass':>9} {'tok/pass':>9} {'identical':>10}")
    summary = {}
    for s, rows in tk.items():
        for m in args.methods:
            r = rows[m]
            print(f"{s:<8} {m:<14} {r['speedup']:>8.2f} {r['mean_accepted_per_pass']:>9.2f} "
                  f"{r['tokens_per_pass']:>9.2f} {r['identical_to_plain']:>5}/{len(sets[s])}")
        if s in hf:
            print(f"{s:<8} {'HF prompt lookup':<14} {hf[s]['prompt_lookup_speedup']:>8.2f}  (over HF plain greedy)")
        best = max(args.methods, key=lambda m: rows[m]["speedup"]) if args.methods else None
        summary[s] = {
            "best_method": best,
            "best_speedup": rows[best]["speedup"] if best else None,
            "hf_prompt_lookup_speedup": hf[s]["prompt_lookup_speedup"] if s in hf else None,
        }
    title = f"Gemma 3 270M f32, greedy, batch 1, {args.new_tokens} new tokens, K={args.k}, {machine}"
    if args.results:
        with open(args.results, "w") as f:
            json.dump({"setup": title, "tokax": tk, "hf": hf, "summary": summary}, f, indent=1)
    if args.plot:
        plot(tk, hf, args.methods, args.plot, title)
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
