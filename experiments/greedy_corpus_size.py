"""How much the retrieval tree gains from each share of the greedy corpus (a replay).

Builds the datastore from the standard library's training split plus the first
fraction of the shipped greedy corpus (``tokax/assets/gemma3_270m_greedy_code``,
weighted as ``configs/speculative.py`` weights it), and replays the
``retrieval_tree`` default against plain greedy's outputs on the speculative
benchmark's code prompts (``tokax.decode.replay``): tokens per target pass
for each fraction. A curve that flattens says more of the same corpus will
not buy much.

    python experiments/greedy_corpus_size.py [--fractions 0,0.25,0.5,1] [--refs refs.json] [--json]

``--refs``: the plain greedy outputs cache of ``experiments/replay_drafts.py``
(made if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fractions", default="0,0.25,0.5,1")
    ap.add_argument("--n-prompts", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--refs", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from benchmarks.speculative import code_prompts
    from experiments.replay_drafts import greedy_refs
    from tokax.data.greedy import greedy_corpus_docs
    from tokax.data.stdlib import stdlib_docs
    from tokax.decode.proposers.retrieval import build_table
    from tokax.decode import methods
    from tokax.decode.replay import replay_greedy
    from tokax.tokenize import load_gemma3_tokenizer

    b = methods.default_block("retrieval_tree")
    tok = load_gemma3_tokenizer()
    ids = [tok.encode(p, add_bos=True) for p in code_prompts(args.n_prompts)]
    refs = greedy_refs({"code": ids}, args.new_tokens, args.refs)["code"]
    stdlib, greedy = stdlib_docs(tok), greedy_corpus_docs()
    out = {}
    for frac in (float(x) for x in args.fractions.split(",")):
        part = greedy[:round(len(greedy) * frac)]
        table = build_table(stdlib + part * b.greedy_weight, max_n=b.ngram, min_count=b.min_count)
        prop, _ = methods.build("retrieval_tree", b, None, None, datastore=table)
        r = replay_greedy(prop, table, ids, refs)
        out[frac] = {"greedy_documents": len(part), "tokens_per_pass": r["tokens_per_pass"]}
        print(f"greedy corpus x {frac:g} ({len(part)} documents): {r['tokens_per_pass']:.3f} tokens/pass",
              file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
