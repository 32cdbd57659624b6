"""Job: speculative decoding of a prompts file with Gemma 3 270M as the
target (``configs/speculative.py``); prints text, or one JSON line per prompt
(``prompt``, ``token_ids``, ``text``, ``stats``) when ``json`` is set."""

from __future__ import annotations

import json
import os
import sys
import time

from tokax.jobs import check, load_prompts

METHODS = ("draft", "prompt_lookup", "anpd", "kangaroo", "specdec_pp")


def validate(c) -> None:
    check(c.model == "gemma3-270m", "model", c.model, "only 'gemma3-270m' is available")
    check(c.dtype in ("float32", "bfloat16"), "dtype", c.dtype, "use float32 or bfloat16")
    check(c.max_new_tokens >= 1, "max_new_tokens", c.max_new_tokens, "must be >= 1")
    check(c.temperature >= 0, "temperature", c.temperature, "must be >= 0 (0 means greedy)")
    check(c.top_k >= 0, "top_k", c.top_k, "must be >= 0 (0 disables)")
    check(0 < c.top_p <= 1, "top_p", c.top_p, "must be in (0, 1] (1 disables)")
    check(0 <= c.min_p <= 1, "min_p", c.min_p, "must be in [0, 1] (0 disables)")
    check(c.batch_size >= 1, "batch_size", c.batch_size, "must be >= 1")
    check(c.method in METHODS, "method", c.method, f"use one of {', '.join(METHODS)}")
    check(c.k >= 1, "k", c.k, "must be >= 1 (maximum draft tokens per round)")
    check(1 <= c.min_ngram <= c.max_ngram, "min_ngram", c.min_ngram, f"need 1 <= min_ngram <= max_ngram={c.max_ngram}")
    check(c.min_ngram <= c.init_ngram <= c.max_ngram, "init_ngram", c.init_ngram, "must be in [min_ngram, max_ngram]")
    check(0 <= c.kangaroo_threshold <= 1, "kangaroo_threshold", c.kangaroo_threshold, "must be in [0, 1]")
    check(0 <= c.specdec_threshold <= 1, "specdec_threshold", c.specdec_threshold, "must be in [0, 1]")
    check(0 < c.specdec_prior < 1, "specdec_prior", c.specdec_prior, "must be in (0, 1)")
    for key in ("kangaroo_adapter", "specdec_head"):
        path = c[key]
        check(not path or os.path.exists(path), key, path, "file does not exist (\"\" for the untrained default)")


def build_proposer(c, cfg, params):
    """(proposer, its params) for ``c.method`` on target ``(cfg, params)``."""
    import jax

    from tokax.decode import proposers as P
    from tokax.decode.proposers import kangaroo, specdec_pp
    from tokax.decode.proposers.draft_model import truncated_draft

    if c.method == "prompt_lookup":
        return P.PromptLookupProposer(k=c.k, max_ngram=c.max_ngram, min_ngram=c.min_ngram), None
    if c.method == "anpd":
        return P.ANPDProposer(k=c.k, max_ngram=c.max_ngram, min_ngram=c.min_ngram, init_ngram=c.init_ngram), None
    if c.method == "kangaroo":
        check(1 <= c.kangaroo_layers < cfg.n_layers, "kangaroo_layers", c.kangaroo_layers,
              f"must be in [1, {cfg.n_layers - 1}]")
        prop = P.KangarooProposer.make(cfg, c.kangaroo_layers, k=c.k, threshold=c.kangaroo_threshold)
        if c.kangaroo_adapter:
            adapter = P.load_params(c.kangaroo_adapter)
        else:
            adapter = kangaroo.init_adapter(cfg, c.kangaroo_layers, jax.random.PRNGKey(c.seed), identity=True)
        return prop, adapter
    check(1 <= c.draft_layers < cfg.n_layers, "draft_layers", c.draft_layers, f"must be in [1, {cfg.n_layers - 1}]")
    dcfg, dparams = truncated_draft(cfg, params, c.draft_layers)
    if c.method == "draft":
        return P.DraftModelProposer(dcfg, k=c.k), dparams
    prop = P.SpecDecPPProposer(cfg=dcfg, k=c.k, threshold=c.specdec_threshold)
    if c.specdec_head:
        head = P.load_params(c.specdec_head)
    else:
        head = specdec_pp.init_head(dcfg.d_model, jax.random.PRNGKey(c.seed), prior=c.specdec_prior)
    return prop, {"model": dparams, "head": head}


def run(c) -> list[dict]:
    """Speculative decoding of every prompt in ``c.prompts_file``."""
    from tqdm.auto import tqdm

    from tokax.decode.sampling import SamplingParams
    from tokax.decode.speculative import SpeculativeGenerator
    from tokax.model.loaders.gguf import load_gemma3
    from tokax.tokenize import load_gemma3_tokenizer

    validate(c)
    prompts = load_prompts(c.prompts_file)
    sp = SamplingParams.make(c.temperature, c.top_k, c.top_p, c.min_p)
    quiet = c.json
    t0 = time.perf_counter()
    cfg, params = load_gemma3(c.dtype, progress=not quiet)
    tok = load_gemma3_tokenizer()
    proposer, pparams = build_proposer(c, cfg, params)
    gen = SpeculativeGenerator(cfg, params, proposer, pparams, tok)
    if not quiet:
        print(f"loaded {cfg.name} ({c.dtype}) in {time.perf_counter() - t0:.1f}s; method {c.method}", file=sys.stderr)
    rows, t_gen, n_tok, passes, accepted = [], 0.0, 0, 0, 0
    batches = [prompts[i : i + c.batch_size] for i in range(0, len(prompts), c.batch_size)]
    for bi, batch in enumerate(tqdm(batches, desc=c.method, unit="batch", disable=quiet)):
        t = time.perf_counter()
        outs, stats = gen.generate(batch, c.max_new_tokens, sp, seed=c.seed + bi)
        t_gen += time.perf_counter() - t
        for p, ids, st in zip(batch, outs, stats):
            n_tok += len(ids)
            passes += st["target_passes"]
            accepted += st["accepted"]
            row = {"prompt": p, "token_ids": ids, "text": tok.decode(ids, skip_special_tokens=True), "stats": st}
            rows.append(row)
            if quiet:
                print(json.dumps(row, ensure_ascii=False), flush=True)
            else:
                tqdm.write(f"\n--- prompt: {p!r}\n{p}\033[1m{row['text']}\033[0m\n{st}")
    if not quiet:
        print(
            f"\n{c.method}: {n_tok} tokens in {t_gen:.2f}s ({n_tok / max(t_gen, 1e-9):.1f} tokens/s, compile "
            f"included), {accepted / max(passes, 1):.2f} accepted drafts per target pass",
            file=sys.stderr,
        )
    return rows
