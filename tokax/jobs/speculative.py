"""Job: speculative decoding of a prompts file with Gemma 3 270M as the target
(``configs/speculative.py``: ``method`` and one block per method, built by the registry
``tokax.decode.methods``); prints text, or one JSON line per prompt (``prompt``,
``token_ids``, ``text``, ``stats``) when ``json`` is set; status lines and the progress bar
go to stderr."""

from __future__ import annotations

import sys
import time

from tokax.decode import methods
from tokax.jobs import check, check_decoding, load_decoding, print_row

METHODS = methods.method_names()


def validate(c) -> None:
    check_decoding(c)
    check(c.method in METHODS, "method", c.method, f"use one of {', '.join(METHODS)}")
    check(c.verify_sizes in methods.VERIFY_SIZES, "verify_sizes", c.verify_sizes,
          f"use one of {', '.join(methods.VERIFY_SIZES)}")
    methods.check_block(c.method, c[c.method], c.draft_model, prefix="--config.")


def make_generator(c, cfg, params, tok=None, **kw):
    """The generator for ``c.method`` with its block of config ``c``; ``kw`` go to its constructor."""
    return methods.make_generator(c.method, c[c.method], cfg, params, tok, draft_model=c.draft_model,
                                  verify_sizes=c.verify_sizes, greedy_screen=c.greedy_screen, **kw)


def run(c) -> list[dict]:
    """Speculative decoding of every prompt in ``c.prompts_file`` (chain or tree method)."""
    validate(c)
    return decode_prompts(c, lambda cfg, params, tok: make_generator(c, cfg, params, tok))


def decode_prompts(c, make) -> list[dict]:
    """Load Gemma, build the generator with ``make(cfg, params, tokenizer)``, decode
    ``c.prompts_file`` in batches, print text (or JSON lines with ``stats``) and a summary."""
    from tqdm.auto import tqdm

    from tokax.console import note, progress_disabled
    from tokax.decode.sampling import SamplingParams

    prompts, lengths, tok, cfg, params, secs = load_decoding(c)
    sp = SamplingParams.make(c.temperature, c.top_k, c.top_p, c.min_p)
    quiet = c.json  # results as JSON lines on stdout; status lines and bars still go to stderr
    disable = progress_disabled(c.get("progress", None))
    gen = make(cfg, params, tok)
    note("tokax.speculative", f"loaded {cfg.name} ({c.dtype}) in {secs:.1f}s; method "
         f"{c.method}; {len(prompts)} prompt(s), longest {max(lengths)} tokens")
    rows, t_gen, n_tok, passes, accepted = [], 0.0, 0, 0, 0
    batches = [prompts[i : i + c.batch_size] for i in range(0, len(prompts), c.batch_size)]
    for bi, batch in enumerate(tqdm(batches, desc=c.method, unit="batch", disable=disable)):
        t = time.perf_counter()
        outs, stats = gen.generate(batch, c.max_new_tokens, sp, seed=c.seed + bi)
        t_gen += time.perf_counter() - t
        for p, ids, st in zip(batch, outs, stats):
            n_tok += len(ids)
            passes += st["target_passes"]
            accepted += st["accepted"]
            row = {"prompt": p, "token_ids": ids, "text": tok.decode(ids, skip_special_tokens=True), "stats": st}
            rows.append(row)
            print_row(row, quiet, extra=str(st))
    note("tokax.speculative",
         f"{c.method}: {n_tok} tokens in {t_gen:.2f}s ({n_tok / max(t_gen, 1e-9):.1f} tokens/s, compile "
         f"included), {accepted / max(passes, 1):.2f} accepted drafts per target pass")
    return rows


def compare_methods(c, names, cfg, params, tok, prompts, pad_to, plain_rows, t_plain, quiet=False) -> list[dict]:
    """``make demo``'s table: each speculative method of ``names`` (its registry defaults, greedy,
    batch 1, compile excluded) on the prompts plain decoding just ran, against its time and
    output (``plain_rows``)."""
    from tqdm.auto import tqdm

    from tokax.console import progress_disabled
    from tokax.decode.sampling import SamplingParams

    if c.temperature != 0:
        print("compare_methods: skipped (the comparison is greedy; set temperature=0)", file=sys.stderr)
        return []
    sp = SamplingParams.make(0.0)
    n_plain = sum(len(r["token_ids"]) for r in plain_rows)
    table = [{"method": "plain", "tok_s": n_plain / max(t_plain, 1e-9), "speedup": 1.0, "tokens_per_pass": 1.0,
              "identical": f"{len(plain_rows)}/{len(plain_rows)}"}]
    for m in names:
        check(m in METHODS, "compare_methods", m, f"use names from {', '.join(METHODS)}")
        gen = methods.make_generator(m, methods.default_block(m), cfg, params, tok, greedy_screen=True)
        gen.generate([prompts[0]], c.max_new_tokens, sp, pad_to=pad_to)  # compile outside the timing
        dt, n, passes, same = 0.0, 0, 0, 0
        for p, ref in zip(tqdm(prompts, desc=m, unit="prompt", disable=progress_disabled(c.get("progress", None))),
                          plain_rows):
            t = time.perf_counter()
            (ids,), (st,) = gen.generate([p], c.max_new_tokens, sp, pad_to=pad_to)
            dt += time.perf_counter() - t
            n += len(ids)
            passes += st["target_passes"]
            same += ids == ref["token_ids"]
        table.append({"method": m, "tok_s": n / max(dt, 1e-9), "speedup": t_plain / max(dt, 1e-9) * n / max(n_plain, 1),
                      "tokens_per_pass": n / max(passes, 1), "identical": f"{same}/{len(prompts)}"})
    out = sys.stdout if not quiet else sys.stderr
    print(f"\n{'method':<14} {'tok/s':>7} {'speedup':>8} {'tok/pass':>9} {'= plain':>8}", file=out)
    for r in table:
        print(f"{r['method']:<14} {r['tok_s']:>7.1f} {r['speedup']:>8.2f} {r['tokens_per_pass']:>9.2f} "
              f"{r['identical']:>8}", file=out)
    return table
