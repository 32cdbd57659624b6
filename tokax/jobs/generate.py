"""Job: plain decoding of a prompts file with Gemma 3 270M (``configs/generate.py``, and
``configs/demo.py`` for ``make demo``). Prints each prompt with its continuation, or one JSON
line per prompt (``prompt``, ``token_ids``: generated ids only, ``text``) when ``json`` is set;
status lines and the progress bar go to stderr."""

from __future__ import annotations

import time

from tokax.jobs import check_decoding, load_decoding, print_row


def validate(c) -> None:
    check_decoding(c)


def run(c, demo: bool = False) -> list[dict]:
    """Plain decoding of every prompt in ``c.prompts_file``; in demo mode also tokens/s and the
    comparison with the speculative methods of ``c.compare_methods``."""
    from tqdm.auto import tqdm

    from tokax.console import note, progress_disabled
    from tokax.decode.generate import Generator, bucket
    from tokax.decode.sampling import SamplingParams

    validate(c)
    prompts, lengths, tok, cfg, params, secs = load_decoding(c)
    sp = SamplingParams.make(c.temperature, c.top_k, c.top_p, c.min_p)
    quiet = c.json  # results as JSON lines on stdout; status lines and bars still go to stderr
    disable = progress_disabled(c.get("progress", None))
    # Greedy tokens through the bf16 screen of the unembedding (same tokens; float32 only).
    gen = Generator(cfg, params, tok, greedy_screen=bool(c.get("greedy_screen", False)) and cfg.dtype == "float32")
    note("tokax.generate", f"loaded {cfg.name} ({c.dtype}) in {secs:.1f}s; {len(prompts)} "
         f"prompt(s), longest {max(lengths)} tokens, {c.max_new_tokens} new tokens each")
    rows, n_tok, t_gen = [], 0, 0.0
    # One padded prompt length for every batch: one compiled program.
    pad_to = bucket(max(lengths))
    batches = [prompts[i : i + c.batch_size] for i in range(0, len(prompts), c.batch_size)]
    if demo:  # compile outside the timed region, as any benchmark would
        note("tokax.generate", "compiling (the timed runs exclude it)")
        gen.generate(batches[0], c.max_new_tokens, sp, seed=c.seed, pad_to=pad_to)
    for bi, batch in enumerate(tqdm(batches, desc="generate", unit="batch", disable=disable)):
        t = time.perf_counter()
        outs = gen.generate(batch, c.max_new_tokens, sp, seed=c.seed + bi, pad_to=pad_to)
        t_gen += time.perf_counter() - t
        for p, ids in zip(batch, outs):
            n_tok += len(ids)
            row = {"prompt": p, "token_ids": ids, "text": tok.decode(ids, skip_special_tokens=True)}
            rows.append(row)
            print_row(row, quiet)
    note("tokax.generate",
         f"{n_tok} tokens in {t_gen:.2f}s = {n_tok / max(t_gen, 1e-9):.1f} tokens/s (batch {c.batch_size}, "
         f"{c.dtype}, {'compile excluded' if demo else 'first batch includes compile'})")
    methods = tuple(c.get("compare_methods", ()) or ()) if demo else ()
    if methods:
        from tokax.jobs.speculative import compare_methods

        compare_methods(c, methods, cfg, params, tok, prompts, pad_to, rows, t_gen, quiet=quiet)
    return rows
