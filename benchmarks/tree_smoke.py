"""Token-tree methods on Gemma 3 270M: tokens per target pass and wall time against plain
greedy, on the bundled demo prompts (a smoke measurement, not issue 5's sweep).

    python benchmarks/tree_smoke.py [--new-tokens 64]

Each prompt is decoded greedily at batch 1 (prompts padded to 32 tokens, one compile per
method, excluded from the timing); prints per method the wall time, the speedup over plain
greedy, tokens per target pass and whether every output equals plain greedy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    ("token_recycling", {"branching": (4, 2, 1), "table_k": 4}),
    ("token_recycling", {"branching": (3, 2, 2, 1), "table_k": 3}),
    ("dyspec", {"draft_layers": 4, "n_nodes": 12, "rounds": 4}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    from tokax.decode.generate import Generator
    from tokax.decode.proposers.tree_proposers import make_tree_proposer
    from tokax.decode.tree_speculative import TreeSpeculativeGenerator
    from tokax.model.loaders.gguf import load_gemma3
    from tokax.tokenize import load_gemma3_tokenizer

    cfg, params = load_gemma3("float32")
    tok = load_gemma3_tokenizer()
    prompts = json.loads((ROOT / "configs" / "prompts" / "demo.json").read_text())
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
    for method, kw in CASES:
        prop, pparams = make_tree_proposer(method, cfg, params, **kw)
        t, outs, st = timed(TreeSpeculativeGenerator(cfg, params, prop, pparams, tok), True)
        tpp = sum(s["new_tokens"] for s in st) / sum(s["target_passes"] for s in st)
        print(f"{method} {kw}: {t:.2f}s, speedup {t_plain / t:.2f}x, tokens/pass {tpp:.2f}, "
              f"identical {outs == ref}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
