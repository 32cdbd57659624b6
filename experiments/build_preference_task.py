"""Build the code-continuation preference task (scored without humans) as JSONL files.

    python experiments/build_preference_task.py --out DIR [--n 2000] [--n-eval 256] [--seed 0] [--context-lines 4]

Writes DIR/pref_train.jsonl and DIR/pref_eval.jsonl ({prompt, chosen, rejected, kind}) and the
unpaired versions DIR/unpaired_{train,eval}.jsonl ({prompt, completion, label}) for KTO / BCO.
prompt = the first lines of a Python standard-library function, chosen = its real next line,
rejected = a line of another function (re-indented) or the real line with its words shuffled.
Train examples come from the corpus' train files, eval examples from its held-out files.
Deterministic: the same seed and Python version give byte-identical files. Point
configs/preference.py at them with --config.data.path=DIR/pref_train.jsonl
--config.data.eval_path=DIR/pref_eval.jsonl (by default the trainer builds the same
files into its workdir).
"""

from __future__ import annotations

import argparse
import collections
import os

from tokax.data.preference import build_code_preference_task, file_digest, preference_to_unpaired, write_jsonl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--n-eval", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--context-lines", type=int, default=4)
    args = ap.parse_args()
    for split, n in (("train", args.n), ("eval", args.n_eval)):
        rows = build_code_preference_task(split, n=n, seed=args.seed, context_lines=args.context_lines)
        path = os.path.join(args.out, f"pref_{split}.jsonl")
        write_jsonl(path, rows)
        write_jsonl(os.path.join(args.out, f"unpaired_{split}.jsonl"), preference_to_unpaired(rows))
        kinds = collections.Counter(r["kind"] for r in rows)
        print(f"{path}: {len(rows)} pairs {dict(kinds)} sha256[:16]={file_digest(path)}")


if __name__ == "__main__":
    main()
