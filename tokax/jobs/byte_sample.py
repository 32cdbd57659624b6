"""Job: complete each prompt of a prompts file (which may end inside a token)
with Gemma 3 270M by exact byte-level sampling, naive token sampling or token
healing (``configs/byte_sample.py``). Prints the prompt with its continuation,
or one JSON line per prompt (``prompt``, ``mode``, ``text``: the continuation
only, ``bytes_hex``: the same continuation as bytes, ``stats``) when ``json`` is
set. A continuation may end inside a UTF-8 character: ``text`` then shows
U+FFFD for the incomplete bytes, ``bytes_hex`` keeps them. A prompt may be
given as ``{"hex": "..."}`` (raw bytes, e.g. cut inside a character); its row's
``prompt`` is that object."""

from __future__ import annotations

import time

from tokax.jobs import check, check_progress, load_prompts, print_row

MODES = ("byte", "naive", "token_healing")


def validate(c) -> None:
    check(c.model == "gemma3-270m", "model", c.model, "only 'gemma3-270m' is available")
    check(c.dtype in ("float32", "bfloat16"), "dtype", c.dtype, "use float32 or bfloat16")
    check(c.mode in MODES, "mode", c.mode, f"use one of {', '.join(MODES)}")
    check(c.max_new_bytes >= 1, "max_new_bytes", c.max_new_bytes, "must be >= 1")
    check(c.temperature >= 0, "temperature", c.temperature, "must be >= 0 (0 means greedy)")
    check_progress(c)


def complete(c, cfg, params, vocab, prompt: str | bytes, seed: int, lm=None) -> dict:
    """One completion in mode ``c.mode``: {prompt, mode, text, bytes_hex, stats}."""
    from tokax.decode.byte_level import ByteLM, sample_bytes
    from tokax.decode.token_healing import complete_tokens

    stop = b"\n" if c.stop_at_newline else b""
    t = time.perf_counter()
    if c.mode == "byte":
        lm = lm or ByteLM(cfg, params, vocab, renormalize=c.renormalize)
        calls0 = lm.calls
        out = sample_bytes(lm, prompt, c.max_new_bytes, c.temperature, seed, stop_bytes=stop)
        data, stats = out.data, {"model_calls": lm.calls - calls0, "ended": out.stopped}
    else:
        out = complete_tokens(cfg, params, vocab, prompt, c.max_new_bytes, mode=c.mode,
                              temperature=c.temperature, seed=seed, stop_bytes=stop)
        data, stats = out.data, {"model_calls": out.model_calls, "token_ids": out.token_ids}
    stats["bytes"] = len(data)
    stats["seconds"] = round(time.perf_counter() - t, 3)
    shown = {"hex": prompt.hex()} if isinstance(prompt, bytes) else prompt
    return {"prompt": shown, "mode": c.mode, "text": data.decode("utf-8", errors="replace"), "bytes_hex": data.hex(),
            "stats": stats}


def run(c) -> list[dict]:
    """Complete every prompt in ``c.prompts_file``; returns the rows it prints."""
    from tqdm.auto import tqdm

    from tokax.console import note, progress_disabled
    from tokax.decode.byte_level import ByteLM
    from tokax.model.loaders.gguf import load_gemma3
    from tokax.tokenize import load_gemma3_tokenizer
    from tokax.tokenize.byte_vocab import ByteVocab

    validate(c)
    prompts = load_prompts(c.prompts_file, allow_bytes=True)
    quiet = c.json
    t0 = time.perf_counter()
    cfg, params = load_gemma3(c.dtype, progress=c.get("progress", None))
    vocab = ByteVocab(load_gemma3_tokenizer())
    lm = ByteLM(cfg, params, vocab, renormalize=c.renormalize) if c.mode == "byte" else None
    note("tokax.byte_sample", f"loaded {cfg.name} ({c.dtype}) in {time.perf_counter() - t0:.1f}s; mode {c.mode}; "
         f"{len(prompts)} prompt(s)")
    rows = []
    for i, p in enumerate(tqdm(prompts, desc=c.mode, unit="prompt", disable=progress_disabled(c.get("progress", None)))):
        row = complete(c, cfg, params, vocab, p, c.seed + i, lm)
        rows.append(row)
        shown = p.decode("utf-8", errors="replace") if isinstance(p, bytes) else p
        print_row(row, quiet, shown=shown, extra=str(row["stats"]))
    return rows
