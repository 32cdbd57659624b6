"""Speculative decoding speed: every tokax method vs tokax plain greedy, with
HF transformers' plain greedy and prompt lookup decoding in the same run.

Target: Gemma 3 270M (the GGUF dequantized to float32) for both tokax and HF.
Three prompt sets of real text, ``--n-prompts`` each (default 20):

* ``code``: prefixes of Python standard-library functions (signature,
  docstring and the first lines of the body), one per file of the stdlib
  corpus's held-out split, which no tokax-trained draft or head saw;
* ``rewrite``: paragraphs of the Python reference manual
  (``pydoc_data.topics``) with a repeat / rewrite / extract instruction;
* ``prose``: the opening sentences of other such paragraphs, to continue.

Every prompt is decoded greedily at batch 1 for exactly ``--new-tokens``
tokens (no stop token), padded to its own power-of-two bucket (``--pad set``:
to the longest of its set), after one warm-up call per method and bucket
that compiles it.
Reported per set and method: wall-clock speedup over tokax plain greedy,
mean accepted draft tokens per target pass, tokens per target pass, and
whether the output equals plain greedy token for token. HF: plain
``generate``, ``generate(prompt_lookup_num_tokens=K)`` and, with
``--hf-assisted``, assisted generation with tokax's distilled draft converted
to an HF model (``tests.model.hf_reference.hf_draft``: the same weights, but
the full tied head, since an HF assistant must score the whole vocabulary; K
tokens per round); ``hf_prompt_lookup_speedup`` is HF prompt lookup over HF
plain greedy (each framework against its own baseline).

    python benchmarks/speculative.py [--json] [--new-tokens 64] [--n-prompts 20] \
        [--methods prompt_lookup,retrieval,retrieval_tree,anpd,draft,tree,dyspec] [--k 5] [--no-hf] \
        [--sweep --sweep-plot PNG] [--spectr] [--plot PNG] [--results JSON]

tokax plain greedy is ``Generator(greedy_screen=True)``: its greedy tokens come
from the same screen as the speculative methods' (before fe8fd16 it computed
float32 logits, a few percent slower; ``benchmarks/screen.py --plain-loop``).
Methods are the names of ``configs/speculative.py`` (chain and token-tree),
with its default ``greedy_screen=True`` (greedy verification through the
bfloat16 screen of the unembedding, ``tokax.model.screen``: the same tokens);
``NAME/f32`` runs a method with float32 logits instead, for comparison;
``retrieval_tree/A-B-C`` runs the retrieval tree with node budgets (A, B, C).
The draft-model methods use the distilled draft shipped with tokax
(``--draft``), blockwise / medusa the shipped trained heads
(``--blockwise-heads``). With ``--json`` the last line maps each set to
``{"best_method", "best_speedup", "hf_prompt_lookup_speedup"}``.

``--tiny`` swaps the target, on both sides, for a random Gemma 3 of the same
structure and vocabulary, 64 wide and 2 layers deep
(``benchmarks/tiny_gemma.py``, the same weights on both sides; prompts
encoded by tokax's tokenizer for both): it shows that both sides run, in
seconds; its numbers are not the benchmark's. ``--smoke`` is the smallest
run of both sides: ``--tiny``, the code set, 1 prompt, 4 new tokens, tokax
plain greedy and prompt lookup against HF plain greedy and prompt lookup.
When a side fails (tokax or HF transformers; with
``--hf-assisted``, a draft that cannot become an HF assistant too), one line
on stderr names it and the error, and the exit status is 1.

``--sweep``: greedy node-budget sweep on ``--sweep-set`` (default code,
``--sweep-prompts`` of its prompts): DySpec with a budget of 4, 8 and 16
nodes against every fixed draft tree of that many nodes in
``SWEEP_TEMPLATES`` (accepted drafts per pass and speedup; plot with
``--sweep-plot``). ``--spectr``: acceptance at temperature 1 of SpecTr with
k = 1..4 i.i.d. draft chains of ``--spectr-length`` tokens against
single-draft speculative sampling (the ``draft`` method, K = that length).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]

# Code prompts come from the held-out (eval) split of the stdlib corpus, which no tokax-trained
# draft or head has seen: one function or method per file, in file order, that has a docstring
# and at least 12 lines.
CODE_MIN_LINES = 12
REWRITE_TEMPLATES = [
    "Repeat the following passage exactly.\n\nPassage:\n{p}\n\nRepeated passage:\n",
    "Rewrite the following passage in plain English, keeping all technical terms.\n\nPassage:\n{p}\n\nRewritten:\n",
    "Copy every sentence of the passage below that contains a quoted keyword.\n\nPassage:\n{p}\n\nSentences:\n",
]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class SideFailed(Exception):
    pass


def side(name: str, fn, *a):
    """``fn(*a)``, with any error turned into ``SideFailed`` naming the side."""
    try:
        return fn(*a)
    except Exception as err:
        msg = " ".join(str(err).split())[:400]  # one line
        raise SideFailed(f"the {name} side failed: {type(err).__name__}" + (f": {msg}" if msg else "")) from err


def code_prompts(n: int) -> list[str]:
    from tokax.data.stdlib import function_prefixes, stdlib_files

    return function_prefixes(stdlib_files("eval"), min_lines=CODE_MIN_LINES, per_file=1)[:n]


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


def method_config(method: str, args, **overrides):
    """``configs/speculative.py`` preset for ``method`` with the benchmark's settings
    (``--k`` for the chain methods, ``--draft``/``--draft-layers``, ``--blockwise-heads``);
    ``overrides`` set keys of the method's block, else top-level keys."""
    import configs.speculative as spec_config
    from tokax.decode import methods

    c = spec_config.get_config(method)
    block = c[method]
    c.seed = 0
    c.draft_model.name, c.draft_model.layers = args.draft, args.draft_layers
    if methods.METHODS[method].loop == "chain" and "k" in block:
        block.k = args.k
    if "heads" in block:
        block.heads = args.blockwise_heads
    for key, val in overrides.items():
        if key in block:
            block[key] = val
        elif key in c and not isinstance(c[key], type(block)):
            c[key] = val
        else:
            raise SystemExit(f"method {method!r} has no key {key!r}; its keys: {', '.join(block.keys())}")
    return c


def warm_up(call, ids, pads) -> None:
    """Compile ``call(ids, pad_to)`` once per prompt bucket (compile time is not measured)."""
    for pad in sorted(set(pads)):
        call(ids[pads.index(pad)], pad)


def run_method(c, cfg, params, ids, N, pads, ref=None, sp=None, seed=0) -> dict:
    """Decode token lists ``ids`` one at a time (``pads``: each one's padded prompt length)
    with the method of config ``c`` (compile excluded); seconds, accepted drafts and tokens per
    target pass, and (with ``ref``) how many outputs equal plain greedy."""
    from tokax.jobs.speculative import make_generator

    gen = make_generator(c, cfg, params, eos_ids=(), pad_id=0)
    kw = {} if sp is None else {"sampling": sp}
    call = lambda x, pad: gen.generate([x], N, pad_to=pad, seed=seed, **kw)  # noqa: E731
    warm_up(call, ids, pads)
    dt, outs = time_calls(lambda xp: call(*xp), list(zip(ids, pads)))
    stats = [o[1][0] for o in outs]
    acc, passes = sum(s["accepted"] for s in stats), sum(s["target_passes"] for s in stats)
    row = {"seconds": dt, "mean_accepted_per_pass": acc / passes,
           "tokens_per_pass": sum(s["new_tokens"] for s in stats) / passes}
    if ref is not None:
        row["identical_to_plain"] = sum(o[0][0] == r for o, r in zip(outs, ref))
    return row


def load_target(tiny: bool = False):
    from tokax.model.loaders.gguf import load_gemma3
    from tokax.tokenize import load_gemma3_tokenizer

    if tiny:
        import tiny_gemma

        cfg = tiny_gemma.tiny_config()
        return cfg, tiny_gemma.tiny_params(cfg), load_gemma3_tokenizer()
    cfg, params = load_gemma3("float32")
    return cfg, params, load_gemma3_tokenizer()


def encode(tok, prompts, pad: str = "prompt"):
    """Token ids of ``prompts`` and the length each is padded to (one compiled program per
    bucket and method). Each prompt gets its own power-of-two bucket, as ``Generator.generate``
    picks by default: padding a 47-token prompt to its set's longest bucket makes every call
    pay a 512-token prefill, plain and speculative alike, which HF (unpadded) does not.
    ``pad="set"`` (``--pad set``) restores the set-wide padding of the runs up to cab3f39."""
    from tokax.decode.generate import bucket

    ids = [tok.encode(p, add_bos=True) for p in prompts]
    if pad == "set":
        return ids, [bucket(max(len(x) for x in ids))] * len(ids)
    return ids, [bucket(len(x)) for x in ids]


def plain_greedy(cfg, params, ids, N, pads):
    from tokax.decode.generate import Generator

    plain = Generator(cfg, params, eos_ids=(), pad_id=0, greedy_screen=True)  # the baseline uses the screen too
    call = lambda x, pad: plain.generate([x], N, pad_to=pad)[0]  # noqa: E731
    warm_up(call, ids, pads)
    return time_calls(lambda xp: call(*xp), list(zip(ids, pads)))


def variant_overrides(method: str) -> tuple[str, dict]:
    """``NAME`` or ``NAME/VARIANT[/VARIANT...]`` -> (NAME, config overrides): ``/f32`` verifies
    greedy rounds from float32 logits; ``/pow2`` or ``/every`` picks the verify-pass lengths
    (``verify_sizes``); ``/stdlib``, ``/greedy`` or ``/stdlib+greedy`` the retrieval corpus;
    ``retrieval_tree/5-3-2`` sets the tree's node budget per candidate; ``/untrained`` runs
    kangaroo with the identity adapter (early exit) and specdec_pp with its constant prior;
    ``kangaroo/t0.4`` or ``specdec_pp/t0.5`` sets the method's stopping threshold."""
    base, *variants = method.split("/")
    over = {}
    for v in variants:
        if v == "f32":
            over["greedy_screen"] = False
        elif v in ("pow2", "every"):
            over["verify_sizes"] = v
        elif v in ("stdlib", "greedy", "stdlib+greedy"):
            over["corpus"] = v
        elif v == "untrained" and base in ("kangaroo", "specdec_pp"):
            over["adapter" if base == "kangaroo" else "head"] = ""
        elif base in ("kangaroo", "specdec_pp") and re.fullmatch(r"t(0|1)?\.\d+", v):
            over["threshold"] = float(v[1:])
        elif base == "retrieval_tree" and re.fullmatch(r"\d+(-\d+)*", v):
            over["branches"] = tuple(int(x) for x in v.split("-"))
        else:
            raise SystemExit(f"method {method!r}: variants are /f32, /pow2, /every, /stdlib, /greedy, "
                             "/stdlib+greedy, retrieval_tree/A-B-C, and for kangaroo and specdec_pp "
                             "/untrained and /tX.Y (threshold)")
    return base, over


def bench_tokax(sets: dict, args, target) -> dict:
    import jax

    cfg, params, tok = target
    N = args.new_tokens
    res = {}
    for name, prompts in sets.items():
        ids, pads = encode(tok, prompts, args.pad)
        t_plain, ref = plain_greedy(cfg, params, ids, N, pads)
        log(f"[{name}] tokax plain greedy: {len(ids) * N / t_plain:.1f} tok/s")
        rows = {"plain": {"seconds": t_plain, "tok_s": len(ids) * N / t_plain}}
        for method in args.methods:
            base, over = variant_overrides(method)
            c = method_config(base, args, **over)
            rows[method] = run_method(c, cfg, params, ids, N, pads, ref)
            rows[method]["speedup"] = t_plain / rows[method]["seconds"]
            log(f"[{name}] {method}: {rows[method]}")
            # Drop this method's compiled programs: a long run otherwise runs out of memory
            # mappings for compiled code (LLVM "Cannot allocate memory" in a run at bb3cbae).
            jax.clear_caches()
        res[name] = rows
    return res


# Fixed tree templates (children per depth) with exactly 4, 8 and 16 nodes, against DySpec's budget.
SWEEP_TEMPLATES = {
    4: [(4,), (2, 1), (1, 1, 1, 1)],
    8: [(8,), (4, 1), (2, 1, 1, 1), (1,) * 8],
    16: [(4, 3), (8, 1), (4, 1, 1, 1), (2,) + (1,) * 7],
}


def template_nodes(branching) -> int:
    n, width = 0, 1
    for b in branching:
        width *= b
        n += width
    return n


def bench_sweep(prompts: list, args, target) -> dict:
    """Node-budget sweep (greedy): DySpec with an n-node budget against every fixed draft tree
    of n nodes in ``SWEEP_TEMPLATES`` (and, with ``--sweep-families tree,token_recycling``,
    Token Recycling on the same templates)."""
    cfg, params, tok = target
    N = args.new_tokens
    ids, pads = encode(tok, prompts, args.pad)
    t_plain, ref = plain_greedy(cfg, params, ids, N, pads)
    out = {"plain_seconds": t_plain, "budgets": {}}
    for n, templates in SWEEP_TEMPLATES.items():
        if args.sweep_budgets and n not in args.sweep_budgets:
            continue
        rows = {}
        c = method_config("dyspec", args, n_nodes=n, rounds=min(n, 6), max_children=4)
        rows["dyspec"] = run_method(c, cfg, params, ids, N, pads, ref)
        for br in templates:
            assert template_nodes(br) == n, (br, n)
            for method in args.sweep_families:
                extra = {"table_k": max(4, max(br))} if method == "token_recycling" else {}
                c = method_config(method, args, branching=br, **extra)
                rows[f"{method}{list(br)}"] = run_method(c, cfg, params, ids, N, pads, ref)
        for r in rows.values():
            r["speedup"] = t_plain / r["seconds"]
        for fam in args.sweep_families:
            best = max((k for k in rows if k.startswith(fam + "[")), key=lambda k: rows[k]["mean_accepted_per_pass"])
            rows[f"best_{fam}"] = best
        out["budgets"][n] = rows
        log(f"[sweep n={n}] " + ", ".join(f"{k}: {v['mean_accepted_per_pass']:.2f}" for k, v in rows.items()
                                          if isinstance(v, dict)))
    return out


def bench_spectr(prompts: list, args, target) -> dict:
    """Acceptance at temperature 1: SpecTr with k i.i.d. draft chains of length L against
    single-draft speculative sampling (the chain ``draft`` method with K = L), same draft."""
    from tokax.decode.sampling import SamplingParams

    cfg, params, tok = target
    N = args.new_tokens
    ids, pads = encode(tok, prompts, args.pad)
    sp = SamplingParams.make(1.0)
    L = args.spectr_length
    rows = {"draft (single chain)": run_method(method_config("draft", args, k=L), cfg, params, ids, N, pads, sp=sp)}
    for k in args.spectr_ks:
        c = method_config("spectr", args, k=k, length=L)
        rows[f"spectr k={k}"] = run_method(c, cfg, params, ids, N, pads, sp=sp)
    log("[spectr T=1] " + ", ".join(f"{m}: {r['mean_accepted_per_pass']:.2f}" for m, r in rows.items()))
    return {"length": L, "temperature": 1.0, "rows": rows}


def hf_assistant(model, args, target):
    """The draft of ``args.draft`` as an HF model for assisted generation
    (``tests.model.hf_reference.hf_draft``; distilled drafts only), proposing ``args.k`` tokens
    per round as tokax's ``draft`` method does; ValueError for a draft that does not convert."""
    if not args.draft.startswith("distilled"):
        raise ValueError(f"--hf-assisted: only the distilled draft converts to an HF model, not {args.draft!r}")
    from tests.model.hf_reference import hf_draft
    from tokax.decode.proposers.distilled import draft_meta, make_draft

    cfg, params, _ = target
    _, dparams = make_draft(cfg, params, args.draft)
    path = args.draft.partition(":")[2] or None
    draft = hf_draft(model, dparams, [int(i) for i in draft_meta(path)["layers"]])
    draft.generation_config.num_assistant_tokens = args.k
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    return draft


def bench_hf(sets: dict, args, target) -> dict:
    """HF plain greedy, prompt lookup decoding and (``--hf-assisted``) assisted generation with the
    distilled draft, each over HF's own plain greedy; ``*_identical`` counts outputs equal to it."""
    import torch

    from tests.model.hf_reference import load_hf

    torch.set_num_threads(os.cpu_count())
    if args.tiny:  # the tokax side's weights, and its tokenizer's ids (the same as HF's on Gemma's vocabulary)
        import tiny_gemma

        cfg, params, tax_tok = target
        model = tiny_gemma.to_hf(cfg, params)
        tok = lambda p, return_tensors: SimpleNamespace(input_ids=torch.tensor([tax_tok.encode(p, add_bos=True)]))  # noqa: E731
    else:
        tok, model = load_hf()
    N = args.new_tokens
    assistant = hf_assistant(model, args, target) if args.hf_assisted else None

    def gen(p, **kw):
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False, **kw)[0].tolist()

    variants = {"prompt_lookup": {"prompt_lookup_num_tokens": args.k}}
    if assistant is not None:
        variants["assisted"] = {"assistant_model": assistant}
    res = {}
    for name, prompts in sets.items():
        gen(prompts[0])  # warm-up
        t_plain, ref = time_calls(gen, prompts)
        res[name] = {"plain_seconds": t_plain}
        for v, kw in variants.items():
            gen(prompts[0], **kw)
            t, outs = time_calls(lambda p: gen(p, **kw), prompts)  # noqa: B023
            res[name].update({f"{v}_seconds": t, f"{v}_speedup": t_plain / t,
                              f"{v}_identical": sum(o == r for o, r in zip(outs, ref))})
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
        if all("assisted_speedup" in hf.get(s, {}) for s in sets):
            bars.append(("HF assisted (distilled draft)", [hf[s]["assisted_speedup"] for s in sets]))
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


def plot_sweep(sweep: dict, path: str, title: str) -> None:
    """Accepted drafts per target pass (left) and speedup (right) against the node budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(int(n) for n in sweep["budgets"])
    if not ns:
        return
    rows = [sweep["budgets"][n] for n in ns]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], "mean_accepted_per_pass", "accepted drafts per target pass"),
                           (axes[1], "speedup", "speedup over plain greedy")):
        ax.plot(ns, [r["dyspec"][key] for r in rows], "o-", label="DySpec (dynamic tree)")
        if "best_tree" in rows[0]:
            ax.plot(ns, [r[r["best_tree"]][key] for r in rows], "s--", label="best fixed draft tree")
        if "best_token_recycling" in rows[0]:
            ax.plot(ns, [r[r["best_token_recycling"]][key] for r in rows], "^:", label="best Token Recycling template")
        for r, n in zip(rows, ns):
            for k, v in r.items():
                if isinstance(v, dict) and k.startswith("tree["):
                    ax.plot([n], [v[key]], ".", color="gray", alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("tree nodes per pass (budget)")
        ax.set_ylabel(label)
        if key == "speedup":
            ax.axhline(1.0, color="k", lw=0.8)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"wrote {path}")


def main():
    try:
        run()
    except SideFailed as err:
        import traceback

        traceback.print_exception(err.__cause__)
        log(f"speculative: {err}")
        sys.exit(1)


def run():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--n-prompts", type=int, default=20)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--draft-layers", type=int, default=4)
    ap.add_argument("--methods", default="prompt_lookup,anpd,draft,specdec_pp,tree,dyspec,token_recycling",
                    help="names of configs/speculative.py; NAME/f32 runs NAME with greedy_screen=False; "
                         "retrieval_tree/A-B-C sets its retrieval_branches")
    ap.add_argument("--sets", default="code,rewrite,prose")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--hf-assisted", action="store_true",
                    help="also time HF assisted generation with the distilled draft converted to an HF model")
    ap.add_argument("--pad", choices=("prompt", "set"), default="prompt",
                    help="pad each prompt to its own power-of-two bucket (default) or all to the set's longest")
    ap.add_argument("--plot", default="", help="write a speedup bar chart (PNG) here")
    ap.add_argument("--results", default="", help="write every number (tokax and HF) to this JSON file")
    ap.add_argument("--blockwise-heads", default="trained",
                    help="'trained' (shipped), a .npz from experiments/train_gemma_heads.py, or '' (untrained)")
    ap.add_argument("--draft", default="distilled", help="draft model: 'distilled' (shipped), 'distilled:DIR', 'truncated'")
    ap.add_argument("--sweep", action="store_true", help="node-budget sweep of the tree methods (greedy)")
    ap.add_argument("--sweep-set", default="code")
    ap.add_argument("--sweep-prompts", type=int, default=10)
    ap.add_argument("--sweep-plot", default="", help="write the node-budget sweep plot (PNG) here")
    ap.add_argument("--sweep-families", default="tree", help="fixed-template methods in the sweep (tree,token_recycling)")
    ap.add_argument("--sweep-budgets", default="", help="comma-separated subset of the budgets 4,8,16")
    ap.add_argument("--spectr-ks", default="1,2,3,4", help="numbers of SpecTr chains")
    ap.add_argument("--spectr", action="store_true", help="SpecTr vs single-draft acceptance at temperature 1")
    ap.add_argument("--spectr-length", type=int, default=4)
    ap.add_argument("--spectr-prompts", type=int, default=10)
    ap.add_argument("--tiny", action="store_true",
                    help="a random 2-layer Gemma 3 target on both sides (benchmarks/tiny_gemma.py): a check that both run")
    ap.add_argument("--smoke", action="store_true",
                    help="smallest run: --tiny --sets code --n-prompts 1 --new-tokens 4 --methods prompt_lookup")
    args = ap.parse_args()
    if args.smoke:
        args.tiny, args.sets, args.n_prompts, args.new_tokens, args.methods = True, "code", 1, 4, "prompt_lookup"
    if args.tiny and args.hf_assisted:
        raise SystemExit("--hf-assisted needs the real target (the distilled draft is Gemma 3 270M's): drop --tiny")
    args.methods = [m for m in args.methods.split(",") if m]
    args.sweep_families = [m for m in args.sweep_families.split(",") if m]
    args.sweep_budgets = [int(n) for n in args.sweep_budgets.split(",") if n]
    args.spectr_ks = [int(k) for k in args.spectr_ks.split(",") if k]
    makers = {"code": code_prompts, "rewrite": rewrite_prompts, "prose": prose_prompts}
    sets = {s: makers[s](args.n_prompts) for s in args.sets.split(",")}
    for s, ps in sets.items():
        if len(ps) < args.n_prompts:
            raise SystemExit(f"prompt set {s!r} has only {len(ps)} prompts (< --n-prompts {args.n_prompts})")

    target = side("tokax", load_target, args.tiny)
    tk = side("tokax", bench_tokax, sets, args, target) if args.methods else {}
    sweep = side("tokax", bench_sweep, sets[args.sweep_set][: args.sweep_prompts], args, target) if args.sweep else None
    spectr = side("tokax", bench_spectr, sets[args.sweep_set][: args.spectr_prompts], args, target) if args.spectr else None
    hf = {} if args.no_hf else side("HF transformers", bench_hf, sets, args, target)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    target_name = "random tiny Gemma 3 (benchmarks/tiny_gemma.py)" if args.tiny else "Gemma 3 270M"
    print(f"\n{target_name} float32, greedy, batch 1, {args.new_tokens} new tokens, K={args.k}, "
          f"prompts padded per {args.pad}, {machine}")
    print(f"{'set':<8} {'method':<14} {'speedup':>8} {'acc/pass':>9} {'tok/pass':>9} {'identical':>10}")
    summary = {}
    for s, rows in tk.items():
        for m in args.methods:
            r = rows[m]
            print(f"{s:<8} {m:<14} {r['speedup']:>8.2f} {r['mean_accepted_per_pass']:>9.2f} "
                  f"{r['tokens_per_pass']:>9.2f} {r['identical_to_plain']:>5}/{len(sets[s])}")
        if s in hf:
            for v, label in (("prompt_lookup", "HF prompt lookup"), ("assisted", "HF assisted (distilled draft)")):
                if f"{v}_speedup" in hf[s]:
                    print(f"{s:<8} {label:<14} {hf[s][f'{v}_speedup']:>8.2f}  (over HF plain greedy; "
                          f"{hf[s][f'{v}_identical']}/{len(sets[s])} outputs equal to it)")
        best = max(args.methods, key=lambda m: rows[m]["speedup"]) if args.methods else None
        summary[s] = {
            "best_method": best,
            "best_speedup": rows[best]["speedup"] if best else None,
            "hf_prompt_lookup_speedup": hf[s]["prompt_lookup_speedup"] if s in hf else None,
        }
    title = (f"{target_name} f32, greedy, batch 1, {args.new_tokens} new tokens, K={args.k}, "
             f"padding per {args.pad}, {machine}")
    if sweep:
        print(f"\nnode-budget sweep ({args.sweep_set}, {args.sweep_prompts} prompts, greedy): accepted drafts per pass"
              " (speedup over plain greedy)")
        for n, rows in sweep["budgets"].items():
            line = f"  {n:>2} nodes: dyspec {rows['dyspec']['mean_accepted_per_pass']:.2f} ({rows['dyspec']['speedup']:.2f}x)"
            for fam in args.sweep_families:
                b = rows[f"best_{fam}"]
                line += f" | best {fam} {b} {rows[b]['mean_accepted_per_pass']:.2f} ({rows[b]['speedup']:.2f}x)"
            print(line)
        if args.sweep_plot:
            plot_sweep(sweep, args.sweep_plot, f"{args.sweep_set} set, {args.sweep_prompts} prompts; " + title)
    if spectr:
        print(f"\nacceptance at temperature 1 ({args.sweep_set}, {args.spectr_prompts} prompts, chains of "
              f"{spectr['length']}): " + ", ".join(f"{m} {r['mean_accepted_per_pass']:.2f}" for m, r in spectr["rows"].items()))
    if args.results:
        with open(args.results, "w") as f:
            json.dump({"setup": title, "tokax": tk, "hf": hf, "summary": summary, "sweep": sweep, "spectr": spectr},
                      f, indent=1)
    if args.plot and tk:
        plot(tk, hf, args.methods, args.plot, title)
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
