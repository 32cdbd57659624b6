"""Job functions: ``run(config) -> list[dict]`` per experiment family.

A job reads a ``ml_collections.ConfigDict`` (see ``configs/``); the command
line lives in ``tokax.run`` only. A job checks its whole config before it
loads anything heavy; bad values raise ``ConfigError`` (``tokax.errors``)
with a message naming the key and the fix, which the launcher prints as one
line.
"""

from __future__ import annotations

import json
import os

from tokax.errors import ConfigError, InputError, check

__all__ = ["ConfigError", "InputError", "check", "load_prompts", "check_decoding", "check_context", "check_progress",
           "load_decoding", "print_row"]


def _read_text(path: str, key: str, hint: str = "save the file as UTF-8") -> str:
    """The UTF-8 text of the file ``--config.KEY`` names, or a ``ConfigError`` saying why not."""
    if not os.path.exists(path):
        raise ConfigError(f"--config.{key}={path!r} does not exist")
    if os.path.isdir(path):
        raise ConfigError(f"--config.{key}={path!r} is a directory; give a file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"--config.{key}={path!r} cannot be read: {e.strerror}") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"--config.{key}={path!r} is not UTF-8 text: byte {e.start} (line {line}) is "
                          f"{raw[e.start:e.start + 1]!r} ({e.reason}); {hint}") from e


def load_prompts(path: str, allow_bytes: bool = False) -> list:
    """The prompts of ``--config.prompts_file``: a non-empty JSON list of strings, UTF-8 encoded,
    each a valid Unicode string (JSON's ``\\ud800``-style escapes can spell lone surrogates,
    which have no UTF-8 bytes and no tokens). With ``allow_bytes`` (byte-level jobs) an entry
    may also be ``{"hex": "..."}``: raw bytes, e.g. a prompt that ends inside a UTF-8 character,
    returned as ``bytes``."""
    hint = ('save the file as UTF-8; a prompt that ends inside a character can be given as {"hex": "..."} '
            "(its bytes)") if allow_bytes else "save the file as UTF-8"
    text = _read_text(path, "prompts_file", hint)
    try:
        prompts = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config.prompts_file={path!r} is not valid JSON: {e}") from e
    what = 'strings or {"hex": "..."} objects' if allow_bytes else "strings"
    if not isinstance(prompts, list) or not prompts:
        raise ConfigError(f"--config.prompts_file={path!r} must hold a non-empty JSON list of {what}")
    for i, p in enumerate(prompts):
        if allow_bytes and isinstance(p, dict) and set(p) == {"hex"} and isinstance(p["hex"], str):
            try:
                prompts[i] = bytes.fromhex(p["hex"])
            except ValueError as e:
                raise ConfigError(f"--config.prompts_file={path!r}: prompt {i}'s \"hex\" is not hex digits: {e}") from e
            if not prompts[i]:
                raise ConfigError(f"--config.prompts_file={path!r}: prompt {i} is empty")
            continue
        if not isinstance(p, str):
            raise ConfigError(f"--config.prompts_file={path!r} must hold a non-empty JSON list of {what}; "
                              f"prompt {i} is {type(p).__name__} {p!r:.60}")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ConfigError(
                f"--config.prompts_file={path!r}: prompt {i} holds a lone surrogate U+{ord(p[e.start]):04X} at "
                f"character {e.start}, which is not text; write the character itself (or its surrogate pair)") from e
    return prompts


def check_progress(c) -> None:
    """The ``progress`` key of every job: None (auto: a bar on stderr when it is a terminal), True, False."""
    if "progress" in c:
        check(c.progress in (None, True, False), "progress", c.progress,
              "use None (auto: shown when stderr is a terminal), True (always) or False")


def check_decoding(c) -> None:
    """The keys every Gemma decoding job shares (configs/generate.py, speculative.py)."""
    from tokax.model.config import gemma3_270m

    limit = gemma3_270m().max_seq_len
    check(c.model == "gemma3-270m", "model", c.model, "only 'gemma3-270m' is available")
    check(c.dtype in ("float32", "bfloat16"), "dtype", c.dtype, "use float32 or bfloat16")
    check(1 <= c.max_new_tokens < limit, "max_new_tokens", c.max_new_tokens,
          f"must be in [1, {limit}) (the model's context of {limit} tokens holds the prompt too)")
    check(c.temperature >= 0, "temperature", c.temperature, "must be >= 0 (0 means greedy)")
    check(c.top_k >= 0, "top_k", c.top_k, "must be >= 0 (0 disables)")
    check(0 < c.top_p <= 1, "top_p", c.top_p, "must be in (0, 1] (1 disables)")
    check(0 <= c.min_p <= 1, "min_p", c.min_p, "must be in [0, 1] (0 disables)")
    check(c.batch_size >= 1, "batch_size", c.batch_size, "must be >= 1")
    check_progress(c)


def check_context(c, prompt_tokens: list[int], max_seq_len: int, extra: int = 0, what: str = "") -> None:
    """The KV cache a decoding job needs fits the model: the longest prompt's bucket plus the
    ``max_new_tokens`` bucket (plus ``extra`` slots a method adds) within ``max_seq_len``."""
    from tokax.decode.generate import bucket

    longest = max(prompt_tokens)
    need = bucket(longest) + bucket(c.max_new_tokens) + extra
    if need > max_seq_len:
        i = prompt_tokens.index(longest)
        more = f" + {extra} {what}" if extra else ""
        raise ConfigError(
            f"--config.max_new_tokens={c.max_new_tokens} is invalid: prompt {i} of --config.prompts_file has "
            f"{longest} tokens (padded to {bucket(longest)}), and with {bucket(c.max_new_tokens)} new-token slots"
            f"{more} the cache needs {need} > the model's max_seq_len={max_seq_len}; lower max_new_tokens or "
            f"shorten the prompt")


def load_decoding(c):
    """What every Gemma decoding job loads first, in the order that fails fastest: the prompts
    (checked), the tokenizer and the prompts' lengths (the context check), then the model.
    Returns ``(prompts, lengths, tokenizer, cfg, params, seconds)``."""
    import time

    from tokax.model.config import gemma3_270m
    from tokax.model.loaders.gguf import load_gemma3
    from tokax.tokenize import load_gemma3_tokenizer

    prompts = load_prompts(c.prompts_file)
    t0 = time.perf_counter()
    tok = load_gemma3_tokenizer()
    lengths = [len(tok.encode(p, add_bos=True)) for p in prompts]
    check_context(c, lengths, gemma3_270m().max_seq_len)
    cfg, params = load_gemma3(c.dtype, progress=c.get("progress", None))
    return prompts, lengths, tok, cfg, params, time.perf_counter() - t0


def print_row(row: dict, as_json: bool, shown: str | None = None, extra: str = "") -> None:
    """One result on stdout: a JSON line, or the prompt with its continuation (bold on a
    terminal) and ``extra`` (a method's statistics), written so that a progress bar on stderr
    stays intact."""
    import json
    import sys

    from tqdm.auto import tqdm

    from tokax.console import emphasize

    if as_json:
        print(json.dumps(row, ensure_ascii=False), flush=True)
        return
    p = row["prompt"]
    tail = f"\n{extra}" if extra else ""
    tqdm.write(f"\n--- prompt: {p!r}\n{p if shown is None else shown}{emphasize(row['text'])}{tail}", file=sys.stdout)
