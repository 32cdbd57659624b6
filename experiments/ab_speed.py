"""Decode speed of two checkouts of tokax, side by side on one machine: a check that a
change keeps speed (a reshaping must stay within noise).

    git archive OLD_COMMIT | tar -x -C /tmp/old        # the earlier checkout
    python experiments/ab_speed.py --a /tmp/old --b . [--groups 3] [--passes 1] \\
        [--spec-args "--sets code,prose --n-prompts 4"] [--decode-args "--n-prompts 4 --no-batch8"] \\
        [--out ab.json]

Each checkout runs its own ``benchmarks/speculative.py --no-hf`` (with its own
``tokax`` first on ``PYTHONPATH``: the scripts may differ where the library's API did) and
its own ``benchmarks/decode_speed.py --no-hf``. The methods are split into ``--groups``
groups, and each group runs once per checkout in alternating order (A then B, then B then
A for the next group, ...), so that a change in the machine's load hits both. Reported
per method and set: tokens/s of A and B and their ratio B/A (tokens/s is the set's new
tokens over the method's decode seconds, compile excluded), and the same for each run's
plain greedy and for ``decode_speed``'s batch-1 tokax rate.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

METHODS = ("prompt_lookup", "retrieval", "anpd", "draft", "kangaroo", "specdec_pp", "lookahead", "blockwise",
           "tree", "dyspec", "spectr", "token_recycling", "medusa", "retrieval_tree")


def run(checkout: str, script: str, args: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, os.path.join("benchmarks", script), *args]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{checkout}: {' '.join(cmd)} exited {r.returncode}:\n{r.stderr[-3000:]}")
    print(f"  {checkout}: {script} {' '.join(args[:4])}... {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
    return r.stdout


def speculative(checkout: str, methods: list[str], extra: list[str], new_tokens: int) -> dict:
    """{set: {method or 'plain': tok/s}} of one run."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    run(checkout, "speculative.py", ["--no-hf", "--methods", ",".join(methods), "--new-tokens", str(new_tokens),
                                     "--results", path, *extra])
    with open(path) as f:
        res = json.load(f)["tokax"]
    os.unlink(path)
    out = {}
    for s, rows in res.items():
        n = rows["plain"]["tok_s"] * rows["plain"]["seconds"]  # the set's new tokens
        out[s] = {m: n / r["seconds"] for m, r in rows.items()}
    return out


def decode_speed(checkout: str, extra: list[str]) -> float:
    return json.loads(run(checkout, "decode_speed.py", ["--no-hf", "--json", *extra]).strip().splitlines()[-1])["tokax_tok_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", required=True, help="the earlier checkout (a directory)")
    ap.add_argument("--b", default=".", help="the later checkout")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--passes", type=int, default=1, help="times each group runs per checkout")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--spec-args", default="--sets code,prose --n-prompts 4")
    ap.add_argument("--decode-args", default="--n-prompts 4 --no-batch8 --new-tokens 64")
    ap.add_argument("--out", default="", help="write every measurement (JSON) here")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    groups = [methods[i :: args.groups] for i in range(args.groups)]
    sides = {"A": args.a, "B": args.b}
    runs = {"A": [], "B": []}
    decode = {"A": [], "B": []}
    turn = 0

    def save(**extra):
        """Everything measured so far (written after every run, so a cut-off A/B keeps its numbers)."""
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"a": args.a, "b": args.b, "spec_args": args.spec_args, "decode_args": args.decode_args,
                           "runs": runs, "decode_speed": decode, **extra}, f, indent=1)

    for _ in range(args.passes):
        for g in groups:
            if not g:
                continue
            order = ("A", "B") if turn % 2 == 0 else ("B", "A")
            turn += 1
            for side in order:
                runs[side].append(speculative(sides[side], g, shlex.split(args.spec_args), args.new_tokens))
                save()
        for side in (("A", "B") if turn % 2 == 0 else ("B", "A")):
            decode[side].append(decode_speed(sides[side], shlex.split(args.decode_args)))
            save()
        turn += 1

    def mean_rates(side):
        acc: dict = {}
        for r in runs[side]:
            for s, rows in r.items():
                for m, v in rows.items():
                    acc.setdefault(s, {}).setdefault(m, []).append(v)
        return {s: {m: sum(v) / len(v) for m, v in rows.items()} for s, rows in acc.items()}

    a, b = mean_rates("A"), mean_rates("B")
    print(f"\nA = {args.a}, B = {args.b}; tokens/s (mean over runs), ratio B/A")
    print(f"| set | method | A tok/s | B tok/s | B/A |\n|---|---|---|---|---|")
    for s in a:
        for m in ["plain", *methods]:
            if m in a[s] and m in b.get(s, {}):
                print(f"| {s} | {m} | {a[s][m]:.1f} | {b[s][m]:.1f} | {b[s][m] / a[s][m]:.3f} |")
    da, db = sum(decode["A"]) / len(decode["A"]), sum(decode["B"]) / len(decode["B"])
    print(f"| decode_speed | tokax batch 1 | {da:.1f} | {db:.1f} | {db / da:.3f} |")
    save(mean={"A": a, "B": b})


if __name__ == "__main__":
    main()
