"""Token-tree methods on Gemma 3 270M: tokens per target pass and wall time against plain
greedy, on the bundled demo prompts (a smoke measurement, not issue 5's sweep).

    python benchmarks/tree_smoke.py [--new-tokens 64] [--n-prompts 5] [--json]
    python benchmarks/tree_smoke.py --smoke --json   # smallest run (a check that it runs)

Each prompt is decoded greedily at batch 1 (prompts padded to 32 tokens, one compile per
method, excluded from the timing); prints per method the wall time, the speedup over plain
greedy, tokens per target pass and whether every output equals plain greedy; with --json,
a last line with the same numbers. ``--tiny`` decodes with a random Gemma 3 of the same
structure and vocabulary, 64 wide and 2 layers deep (``benchmarks/tiny_gemma.py``; DySpec
drafts with its first layer); ``--smoke`` is ``--tiny --new-tokens 4 --n-prompts 1`` with one
setting per method.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (method, its block's settings, layers of the truncated draft of the draft-model methods)
CASES = [
    ("token_recycling", {"branching": (4, 2, 1), "table_k": 4}, None),
    ("token_recycling", {"branching": (3, 2, 2, 1), "table_k": 3}, None),
    ("dyspec", {"n_nodes": 12, "rounds": 4}, 4),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--n-prompts", type=int, default=0, help="the first N demo prompts (default: all)")
    ap.add_argument("--tiny", action="store_true", help="a random 2-layer Gemma 3 (benchmarks/tiny_gemma.py)")
    ap.add_argument("--smoke", action="store_true",
                    help="smallest run: --tiny --new-tokens 4 --n-prompts 1, one setting per method")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.tiny, args.new_tokens, args.n_prompts = True, 4, 1
    from tokax.decode import methods
    from tokax.decode.generate import Generator
    from tokax.model.loaders.gguf import load_gemma3
    from tokax.tokenize import load_gemma3_tokenizer

    cases = CASES
    if args.tiny:
        import tiny_gemma

        cfg = tiny_gemma.tiny_config()
        params = tiny_gemma.tiny_params(cfg)
        cases = [(m, kw, None if layers is None else 1) for m, kw, layers in CASES]
    if args.smoke:
        cases = [c for i, c in enumerate(cases) if c[0] not in [m for m, *_ in cases[:i]]]
    else:
        cfg, params = load_gemma3("float32")
    tok = load_gemma3_tokenizer()
    prompts = json.loads((ROOT / "configs" / "prompts" / "demo.json").read_text())
    prompts = prompts[: args.n_prompts or len(prompts)]
    N = args.new_tokens

    def timed(gen, with_stats):
        gen.generate(prompts[:1], N, pad_to=32)  # compile outside the timing
        t, outs, stats = time.perf_counter(), [], []
        for p in prompts:
            r = gen.generate([p], N, pad_to=32)
            outs.append(r[0][0] if with_stats else r[0])
            stats.append(r[1][0] if with_stats else None)
        return time.perf_counter() - t, outs, stats

    t_plain, ref, _ = timed(Generator(cfg, params, tok), False)
    print(f"plain greedy: {t_plain:.2f}s for {sum(map(len, ref))} tokens", flush=True)
    rows = []
    for method, kw, layers in cases:
        block = methods.default_block(method)
        block.update(kw)
        draft_model = None if layers is None else methods.draft_model_block()
        if draft_model is not None:
            draft_model.name, draft_model.layers = "truncated", layers
            kw = dict(kw, draft_layers=layers)
        gen = methods.make_generator(method, block, cfg, params, tok, draft_model=draft_model)
        t, outs, st = timed(gen, True)
        tpp = sum(s["new_tokens"] for s in st) / sum(s["target_passes"] for s in st)
        print(f"{method} {kw}: {t:.2f}s, speedup {t_plain / t:.2f}x, tokens/pass {tpp:.2f}, "
              f"identical {outs == ref}", flush=True)
        rows.append({"method": method, "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()},
                     "seconds": t, "speedup": t_plain / t, "tokens_per_pass": tpp, "identical": outs == ref})
    if args.json:
        print(json.dumps({"model": cfg.name, "prompts": len(prompts), "new_tokens": N, "plain_seconds": t_plain,
                          "methods": rows}))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
