"""Tokens per target pass of a deterministic draft, without the target: a replay.

Under greedy verification a round accepts the longest draft prefix (for a
token tree: the deepest path) that equals the target's own greedy output,
plus the target's bonus token. For a proposer whose drafts depend only on the
token history (prompt lookup, ANPD, the retrieval datastore and its tree),
the rounds of a speculative run are therefore fixed by plain greedy's output:
this script decodes each prompt once with plain greedy (or reads those
outputs from ``--refs``), then replays every method's proposer against them,
all prompts of a set batched as rows of one jitted ``propose`` call per
round (``tokax.decode.replay``). Its tokens per pass equal the speculative
loop's (``tests/decode/test_replay.py``), at a few seconds per method instead
of a timed run. Wall-clock speedups come only from ``benchmarks/speculative.py``;
with ``--cost`` (the last line of ``benchmarks/pass_cost.py --json``) it also
prints the decode-only speedup the rounds' pass lengths imply on that
machine (drafting and prefill left out), and ``--caps`` replays each method
with at most that many drafted tokens or nodes per round.

    python experiments/replay_drafts.py [--sets code,rewrite,prose] [--n-prompts 20] [--new-tokens 64] \\
        [--refs refs.json] [--cost cost.json] [--caps 0,3] [--json] --methods 'retrieval_tree,retrieval_tree:ngram=4,prompt_lookup'

A method is a name of ``configs/speculative.py`` with the speculative
benchmark's variants (``retrieval_tree/5-2-2``, ``/stdlib``, ...) and then
any overrides of the method's block (``tokax.decode.methods``), else of the config's
top-level keys, as ``:key=value`` (Python literals). The prompts are the
benchmark's sets (``benchmarks/speculative.py``).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

REPLAYABLE = ("prompt_lookup", "anpd", "retrieval", "retrieval_tree")


def parse_method(spec: str):
    """``NAME[/variant..][:key=value..]`` -> (config, label)."""
    from benchmarks.speculative import method_config, variant_overrides

    name, *pairs = spec.split(":")
    base, over = variant_overrides(name)
    if base not in REPLAYABLE:
        raise SystemExit(f"{spec!r}: only drafts that depend on the history alone replay ({', '.join(REPLAYABLE)})")
    for p in pairs:
        key, sep, val = p.partition("=")
        if not sep:
            raise SystemExit(f"{spec!r}: overrides are :key=value")
        try:
            over[key] = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            over[key] = val
    args = argparse.Namespace(k=5, draft_layers=4, draft="distilled", blockwise_heads="")
    c = method_config(base, args, **over)
    from tokax.jobs.speculative import validate

    validate(c)
    return c


def proposer_for(c, cfg, params):
    """(proposer, pparams, verify-pass lengths) as the speculative job builds them (the registry)."""
    from tokax.decode import methods
    from tokax.decode.loop import verify_block_sizes

    prop, pparams = methods.build(c.method, c[c.method], cfg, params, draft_model=c.draft_model)
    if methods.METHODS[c.method].loop == "tree":
        return prop, pparams, methods.pass_sizes(c.verify_sizes, prop.n_nodes) or prop.verify_sizes
    return prop, pparams, verify_block_sizes(prop.k, methods.pass_sizes(c.verify_sizes, prop.k), prop.can_be_empty)


def greedy_refs(sets: dict, N: int, path: str | None) -> dict:
    """Plain greedy outputs per set (float32 through the screen, each prompt in its own bucket,
    as the benchmark's baseline), read from / written to ``path``."""
    if path and os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if all(saved.get(k, {}).get("prompts") == v and saved[k]["new_tokens"] == N for k, v in sets.items()):
            return {k: saved[k]["outputs"] for k in sets}
    from tqdm.auto import tqdm

    from benchmarks.speculative import load_target
    from tokax.decode.generate import Generator, bucket

    cfg, params, _ = load_target()
    plain = Generator(cfg, params, eos_ids=(), pad_id=0, greedy_screen=True)
    out = {}
    for name, ids in sets.items():
        pads = [bucket(len(x)) for x in ids]
        out[name] = {"prompts": ids, "new_tokens": N,
                     "outputs": [list(map(int, plain.generate([x], N, pad_to=p)[0]))
                                 for x, p in tqdm(list(zip(ids, pads)), desc=f"plain greedy [{name}]")]}
    if path:
        with open(path, "w") as f:
            json.dump(out, f)
    return {k: v["outputs"] for k, v in out.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", required=True)
    ap.add_argument("--sets", default="code")
    ap.add_argument("--n-prompts", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--refs", default=None, help="JSON cache of the plain greedy outputs")
    ap.add_argument("--caps", default="0", help="comma-separated drafted-node caps per round (0: none)")
    ap.add_argument("--cost", default=None,
                    help="the last line of `benchmarks/pass_cost.py --json` (a file): estimate decode-only speedups")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    caps = [int(x) for x in args.caps.split(",")]
    cost = None
    if args.cost:
        with open(args.cost) as f:
            cost = {int(k): v for k, v in json.load(f)["ms"].items()}

    from benchmarks import speculative as bench
    from tokax.decode.replay import estimated_speedup, replay_greedy
    from tokax.tokenize import load_gemma3_tokenizer

    tok = load_gemma3_tokenizer()
    builders = {"code": bench.code_prompts, "rewrite": bench.rewrite_prompts, "prose": bench.prose_prompts}
    sets = {s: [tok.encode(p, add_bos=True) for p in builders[s](args.n_prompts)] for s in args.sets.split(",")}
    refs = greedy_refs(sets, args.new_tokens, args.refs)
    results = {}
    for spec in args.methods.split(","):
        c = parse_method(spec)
        prop, pparams, sizes = proposer_for(c, None, None)
        for cap in caps:
            label = spec + (f"@cap{cap}" if cap else "")
            for s in sets:
                t = time.perf_counter()
                r = replay_greedy(prop, pparams, sets[s], refs[s], sizes, cap)
                if cost:
                    try:
                        r["est_decode_speedup"] = estimated_speedup(r, cost)
                    except ValueError as e:  # a pass length the cost table lacks
                        r["est_decode_speedup"] = None
                        print(f"[{s}] {label}: {e}", file=sys.stderr)
                results.setdefault(s, {})[label] = r
                est = f", est. {r['est_decode_speedup']:.3f}x decode-only" if cost and r["est_decode_speedup"] else ""
                print(f"[{s}] {label}: {r['tokens_per_pass']:.3f} tokens/pass, {r['drafted_per_pass']:.2f} drafted, "
                      f"{r['empty_rounds']:.1%} empty, passes by length {r['pass_lengths']}{est} "
                      f"({time.perf_counter() - t:.1f} s)", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({s: {m: {k: v for k, v in r.items() if k != "row_passes"} for m, r in rows.items()}
                          for s, rows in results.items()}))


if __name__ == "__main__":
    main()
