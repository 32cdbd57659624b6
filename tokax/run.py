"""Command-line launcher: ``python -m tokax.run --config configs/X.py --config.key=value``.

The config's ``job`` key picks what runs: ``generate`` / ``demo`` (plain
decoding), ``train`` (the training core). Unknown keys and bad values fail
with a message naming them.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "path to a config file in configs/", lock_config=True)


from tokax.jobs import ConfigError, load_prompts
from tokax.jobs import check_decoding


def validate_generate(c) -> None:
    check_decoding(c)


def run_generate(c, demo: bool = False) -> list[dict]:
    """Plain decoding of every prompt in ``c.prompts_file``; prints text (or
    JSON lines) and, in demo mode, tokens/s."""
    from tqdm.auto import tqdm

    from tokax.decode.generate import Generator
    from tokax.decode.sampling import SamplingParams
    from tokax.model.loaders.gguf import load_gemma3
    from tokax.tokenize import load_gemma3_tokenizer

    validate_generate(c)
    prompts = load_prompts(c.prompts_file)
    sp = SamplingParams.make(c.temperature, c.top_k, c.top_p, c.min_p)
    quiet = c.json
    t0 = time.perf_counter()
    cfg, params = load_gemma3(c.dtype, progress=not quiet)
    tok = load_gemma3_tokenizer()
    # Greedy tokens through the bf16 screen of the unembedding (same tokens; float32 only).
    gen = Generator(cfg, params, tok, greedy_screen=bool(c.get("greedy_screen", False)) and cfg.dtype == "float32")
    if not quiet:
        print(f"loaded {cfg.name} ({c.dtype}) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    rows, n_tok, t_gen = [], 0, 0.0
    from tokax.decode.generate import bucket

    # One padded prompt length for every batch: one compiled program.
    pad_to = bucket(max(len(x) for x in gen.encode(prompts)))
    batches = [prompts[i : i + c.batch_size] for i in range(0, len(prompts), c.batch_size)]
    if demo:  # compile outside the timed region, as any benchmark would
        gen.generate(batches[0], c.max_new_tokens, sp, seed=c.seed, pad_to=pad_to)
    for bi, batch in enumerate(tqdm(batches, desc="generate", unit="batch", disable=quiet)):
        t = time.perf_counter()
        outs = gen.generate(batch, c.max_new_tokens, sp, seed=c.seed + bi, pad_to=pad_to)
        t_gen += time.perf_counter() - t
        for p, ids in zip(batch, outs):
            n_tok += len(ids)
            row = {"prompt": p, "token_ids": ids, "text": tok.decode(ids, skip_special_tokens=True)}
            rows.append(row)
            if quiet:
                print(json.dumps(row, ensure_ascii=False), flush=True)
            else:
                tqdm.write(f"\n--- prompt: {p!r}\n{p}\033[1m{row['text']}\033[0m")
    if not quiet:
        print(
            f"\n{n_tok} tokens in {t_gen:.2f}s = {n_tok / max(t_gen, 1e-9):.1f} tokens/s "
            f"(batch {c.batch_size}, {c.dtype}, {'compile excluded' if demo else 'first batch includes compile'})",
            file=sys.stderr,
        )
    methods = tuple(c.get("compare_methods", ()) or ()) if demo else ()
    if methods:
        from tokax.jobs.speculative import compare_methods

        compare_methods(c, methods, cfg, params, tok, prompts, pad_to, rows, t_gen, quiet=quiet)
    return rows


JOBS = {
    "generate": lambda c: run_generate(c),
    "demo": lambda c: run_generate(c, demo=True),
}


def _lazy(module: str, fn: str = "run"):
    """A job implemented in another module, imported only when it runs."""

    def job(c):
        import importlib

        return getattr(importlib.import_module(module), fn)(c)

    return job


JOBS["train"] = _lazy("tokax.train.trainer")
JOBS["speculative"] = _lazy("tokax.jobs.speculative")
JOBS["byte_sample"] = _lazy("tokax.jobs.byte_sample")
JOBS["tree"] = _lazy("tokax.jobs.tree")
JOBS["train_heads"] = _lazy("tokax.jobs.train_heads")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}; use --config.key=value")
    c = _CONFIG.value
    if c is None:
        raise app.UsageError("pass --config configs/NAME.py")
    job = c.get("job")
    if job not in JOBS:
        raise ConfigError(f"config job={job!r} is not one of {sorted(JOBS)}")
    try:
        JOBS[job](c)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def check_override_keys(argv: list[str]) -> None:
    """Fail with a readable message on ``--config.key`` overrides that the
    config file does not define (ml_collections would raise a bare
    AttributeError from inside flag parsing)."""
    import importlib.util

    path = None
    keys = []
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif a.startswith("--config."):
            keys.append(a[len("--config.") :].split("=", 1)[0])
    if path is None:
        return
    file, _, arg = path.partition(":")
    if not os.path.exists(file):
        raise ConfigError(f"--config {file!r} does not exist")
    spec = importlib.util.spec_from_file_location("_tokax_config", file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config(arg or None)
    for key in keys:
        node = cfg
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(none)"
                raise ConfigError(f"unknown config key {key!r} for {file}; valid keys here: {valid}")
            node = node[part]


def cli():
    # Config files import siblings as `configs.X`: run from the project root.
    sys.path.insert(0, os.getcwd())
    try:
        check_override_keys(sys.argv[1:])
        app.run(main)
    except ConfigError as e:  # pragma: no cover - raised before main's handler
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
