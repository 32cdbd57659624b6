"""Job: speculative decoding of a prompts file with Gemma 3 270M as the
target (``configs/speculative.py`` and its presets ``configs/tree.py``,
``dyspec.py``, ``spectr.py``, ``token_recycling.py``); prints text, or one JSON
line per prompt (``prompt``, ``token_ids``, ``text``, ``stats``) when ``json``
is set; status lines and the progress bar go to stderr."""

from __future__ import annotations

import functools
import json
import os
import sys
import time

from tokax.jobs import check, check_context, check_decoding, load_prompts

CHAIN_METHODS = ("draft", "prompt_lookup", "retrieval", "anpd", "kangaroo", "specdec_pp", "lookahead", "blockwise")
# Token-tree methods run by the tree loop: name here -> name in tree_proposers.make_tree_proposer.
TREE_METHODS = {"tree": "tree", "dyspec": "dyspec", "spectr": "spectr", "token_recycling": "token_recycling",
                "medusa": "medusa", "retrieval_tree": None}  # None: built here (it needs the datastore)
METHODS = CHAIN_METHODS + tuple(TREE_METHODS)


def check_tree_keys(c) -> None:
    """The tree-shape keys of configs/speculative.py (and its tree presets)."""
    check(len(c.branching) >= 1 and all(b >= 1 for b in c.branching), "branching", c.branching,
          "needs >= 1 children per depth")
    check(c.table_k >= max(c.branching), "table_k", c.table_k, f"must be >= max(branching)={max(c.branching)}")
    check(c.n_nodes >= 1 and c.rounds >= 1 and c.max_children >= 1, "n_nodes", c.n_nodes,
          "n_nodes, rounds and max_children must be >= 1")
    check(c.spectr_k >= 1 and c.spectr_length >= 1, "spectr_k", c.spectr_k, "spectr_k and spectr_length must be >= 1")


def validate(c) -> None:
    check_decoding(c)
    check(c.method in METHODS, "method", c.method, f"use one of {', '.join(METHODS)}")
    check(c.k >= 1, "k", c.k, "must be >= 1 (maximum draft tokens per round)")
    check(1 <= c.min_ngram <= c.max_ngram, "min_ngram", c.min_ngram, f"need 1 <= min_ngram <= max_ngram={c.max_ngram}")
    check(c.min_ngram <= c.init_ngram <= c.max_ngram, "init_ngram", c.init_ngram, "must be in [min_ngram, max_ngram]")
    check(c.retrieval_ngram >= 1 and c.retrieval_min_count >= 1, "retrieval_ngram", c.retrieval_ngram,
          "retrieval_ngram and retrieval_min_count must be >= 1")
    check(0 <= c.retrieval_min_conf <= 1, "retrieval_min_conf", c.retrieval_min_conf, "must be in [0, 1]")
    check(0 <= c.retrieval_alt_min_conf <= 1, "retrieval_alt_min_conf", c.retrieval_alt_min_conf, "must be in [0, 1]")
    br = tuple(c.retrieval_branches)
    check(len(br) >= 1 and min(br) >= 1 and max(br) == br[0], "retrieval_branches", br,
          "needs >= 1 node per candidate, the first the largest (it is also the draft length)")
    from tokax.decode.proposers.retrieval import CORPORA

    check(c.retrieval_corpus in CORPORA or os.path.isdir(c.retrieval_corpus), "retrieval_corpus",
          c.retrieval_corpus, f"use one of {', '.join(CORPORA)} or a directory of .py/.txt/.md files")
    if c.retrieval_corpus not in CORPORA and c.method in ("retrieval", "retrieval_tree"):
        check(_has_corpus_files(c.retrieval_corpus), "retrieval_corpus", c.retrieval_corpus,
              "the directory holds no .py/.txt/.md files (searched recursively); point it at some text")
    check_draft(c)
    check(c.get("verify_sizes", "pow2") in VERIFY_SIZES, "verify_sizes", c.get("verify_sizes"),
          f"use one of {', '.join(VERIFY_SIZES)}")
    check(c.retrieval_greedy_weight >= 1, "retrieval_greedy_weight", c.retrieval_greedy_weight, "must be >= 1")
    check(0 <= c.kangaroo_threshold <= 1, "kangaroo_threshold", c.kangaroo_threshold, "must be in [0, 1]")
    check(0 <= c.specdec_threshold <= 1, "specdec_threshold", c.specdec_threshold, "must be in [0, 1]")
    check(0 < c.specdec_prior < 1, "specdec_prior", c.specdec_prior, "must be in (0, 1)")
    for key in TRAINED:
        path = trained_path(key, c[key])
        check(not path or os.path.exists(path), key, path,
              "file does not exist ('trained' for the one shipped with tokax, \"\" for the untrained default)")
    if c.method in TREE_METHODS:
        check_tree_keys(c)
        check(len(c.medusa_topk) >= 1 and all(t >= 1 for t in c.medusa_topk), "medusa_topk", c.medusa_topk,
              "needs one top-k >= 1 per head")
        check(c.method != "medusa" or bool(c.blockwise_heads), "blockwise_heads", c.blockwise_heads,
              "method medusa needs trained heads (.npz from experiments/train_gemma_heads.py)")


def _has_corpus_files(path: str) -> bool:
    return any(fn.endswith((".py", ".txt", ".md")) for _, _, files in os.walk(path) for fn in files)


def check_draft(c) -> None:
    """``draft``: 'distilled' (shipped), 'distilled:DIR' (an export with meta.json) or 'truncated'."""
    from tokax.decode.proposers.distilled import META

    fix = "use 'distilled' (the draft shipped with tokax), 'distilled:DIR' or 'truncated'"
    check(c.draft in ("distilled", "truncated") or c.draft.startswith("distilled:"), "draft", c.draft, fix)
    if c.draft.startswith("distilled:"):
        d = c.draft.partition(":")[2]
        check(os.path.isfile(os.path.join(d, META)), "draft", c.draft,
              f"{d!r} holds no {META}; give a directory written by experiments/distill_gemma_draft.py")


# Keys that name trained weights: 'trained' is the copy shipped in tokax/assets/<dir>/<file>
# (made by the experiment named), else a .npz path, "" = untrained.
TRAINED = {
    "blockwise_heads": ("gemma3_270m_heads", "heads.npz"),  # experiments/train_gemma_heads.py
    "kangaroo_adapter": ("gemma3_270m_kangaroo", "adapter.npz"),  # experiments/train_kangaroo_adapter.py
    "specdec_head": ("gemma3_270m_specdec_head", "head.npz"),  # experiments/train_specdec_head.py
}


def trained_path(key: str, name: str) -> str:
    """The file a ``TRAINED`` key names: the shipped one for 'trained', else ``name``."""
    if name == "trained":
        from tokax import ASSETS_DIR

        return str(ASSETS_DIR.joinpath(*TRAINED[key]))
    return name


def heads_path(name: str) -> str:
    return trained_path("blockwise_heads", name)


def build_proposer(c, cfg, params):
    """(proposer, its params) for ``c.method`` on target ``(cfg, params)``."""
    import jax

    from tokax.decode import proposers as P
    from tokax.decode.proposers import kangaroo, specdec_pp
    from tokax.decode.proposers.distilled import make_draft

    if c.method == "prompt_lookup":
        return P.PromptLookupProposer(k=c.k, max_ngram=c.max_ngram, min_ngram=c.min_ngram), None
    if c.method == "retrieval":
        return P.RetrievalProposer(k=c.k, max_ngram=c.max_ngram, min_ngram=c.min_ngram,
                                   min_conf=c.retrieval_min_conf), retrieval_table(c)
    if c.method == "anpd":
        return P.ANPDProposer(k=c.k, max_ngram=c.max_ngram, min_ngram=c.min_ngram, init_ngram=c.init_ngram), None
    if c.method == "lookahead":
        return P.LookaheadProposer(k=c.k, ngram=c.lookahead_ngram, pool_buckets=c.lookahead_buckets,
                                   pool_slots=c.lookahead_slots), None
    if c.method == "blockwise":
        from tokax.decode.proposers import blockwise

        heads = P.load_params(heads_path(c.blockwise_heads)) if c.blockwise_heads else blockwise.init_heads(cfg.d_model, c.k)
        # k is the most tokens a round drafts: a heads file with fewer heads drafts fewer
        k = min(c.k, int(heads["w"].shape[0]))
        return P.BlockwiseProposer(k=k, sample_drafts=c.blockwise_sample_drafts), heads
    if c.method == "kangaroo":
        check(1 <= c.kangaroo_layers < cfg.n_layers, "kangaroo_layers", c.kangaroo_layers,
              f"must be in [1, {cfg.n_layers - 1}]")
        prop = P.KangarooProposer.make(cfg, c.kangaroo_layers, k=c.k, threshold=c.kangaroo_threshold)
        if not c.kangaroo_adapter:
            return prop, kangaroo.init_adapter(cfg, c.kangaroo_layers, jax.random.PRNGKey(c.seed), identity=True)
        return prop, kangaroo.load_adapter(trained_path("kangaroo_adapter", c.kangaroo_adapter), cfg, params,
                                           c.kangaroo_layers)
    if c.draft == "truncated":
        check(1 <= c.draft_layers < cfg.n_layers, "draft_layers", c.draft_layers, f"must be in [1, {cfg.n_layers - 1}]")
    dcfg, dparams = make_draft(cfg, params, c.draft, c.draft_layers)
    if c.method == "draft":
        return P.DraftModelProposer(dcfg, k=c.k), dparams
    prop = P.SpecDecPPProposer(cfg=dcfg, k=c.k, threshold=c.specdec_threshold)
    if c.specdec_head:
        check(c.specdec_head != "trained" or c.draft == "distilled", "specdec_head", c.specdec_head,
              f"the shipped head was trained on draft='distilled', not {c.draft!r} (give a .npz, or \"\")")
        head = P.load_params(trained_path("specdec_head", c.specdec_head))
    else:
        head = specdec_pp.init_head(dcfg.d_model, jax.random.PRNGKey(c.seed), prior=c.specdec_prior)
    return prop, {"model": dparams, "head": head}


def retrieval_tree_proposer(c):
    """The ``RetrievalTreeProposer`` of config ``c`` (its params: ``retrieval_table(c)``)."""
    from tokax.decode.proposers.retrieval import RetrievalTreeProposer

    return RetrievalTreeProposer(branches=tuple(c.retrieval_branches), max_ngram=c.max_ngram, min_ngram=c.min_ngram,
                                 min_conf=c.retrieval_min_conf, alt_min_conf=c.retrieval_alt_min_conf)


def retrieval_table(c):
    """The n-gram datastore of ``c.retrieval_corpus`` (``tokax.decode.proposers.retrieval``),
    built once per process for each (corpus, retrieval_ngram, retrieval_min_count, retrieval_greedy_weight)."""
    return _corpus_table(c.retrieval_corpus, c.retrieval_ngram, c.retrieval_min_count, c.retrieval_greedy_weight)


@functools.lru_cache(maxsize=4)
def _corpus_table(corpus: str, max_n: int, min_count: int, greedy_weight: int):
    from tokax.decode.proposers.retrieval import corpus_table
    from tokax.tokenize import load_gemma3_tokenizer

    return corpus_table(load_gemma3_tokenizer(), corpus, max_n=max_n, min_count=min_count,
                        greedy_weight=greedy_weight)


def screen_option(c, cfg) -> bool:
    """The configs' ``greedy_screen`` key, honoured for float32 targets (the screen is a bf16 copy)."""
    return bool(c.get("greedy_screen", False)) and cfg.dtype == "float32"


VERIFY_SIZES = ("every", "pow2", "full")


def pass_sizes(c, n: int):
    """The verify-pass lengths of ``c.verify_sizes`` for at most ``n`` drafted tokens or nodes
    (None: the loop's default, 1, 2, 4, .. and n + 1)."""
    mode = c.get("verify_sizes", "pow2")
    return {"every": tuple(range(1, n + 2)), "pow2": None, "full": (n + 1,)}[mode]


def make_generator(c, cfg, params, tok=None, **kw):
    """The generator for ``c.method``: ``SpeculativeGenerator`` (chain methods) or
    ``TreeSpeculativeGenerator`` (token-tree methods); ``kw`` go to its constructor."""
    kw.setdefault("greedy_screen", screen_option(c, cfg))
    if c.method in TREE_METHODS:
        from tokax.decode import proposers as P
        from tokax.decode.proposers.tree_proposers import make_tree_proposer
        from tokax.decode.tree_speculative import TreeSpeculativeGenerator

        if c.method == "retrieval_tree":
            prop = retrieval_tree_proposer(c)
            kw.setdefault("verify_sizes", pass_sizes(c, prop.n_nodes))  # None: the proposer's own
            return TreeSpeculativeGenerator(cfg, params, prop, retrieval_table(c), tok, **kw)
        heads = P.load_params(heads_path(c.blockwise_heads)) if c.method == "medusa" else None
        prop, pparams = make_tree_proposer(
            TREE_METHODS[c.method], cfg, params, draft=c.draft, draft_layers=c.draft_layers,
            branching=tuple(c.branching), n_nodes=c.n_nodes, rounds=c.rounds, max_children=c.max_children,
            table_k=c.table_k, spectr_k=c.spectr_k, spectr_length=c.spectr_length,
            medusa_topk=tuple(c.medusa_topk), medusa_heads=heads)
        return TreeSpeculativeGenerator(cfg, params, prop, pparams, tok, **kw)
    from tokax.decode.speculative import SpeculativeGenerator

    proposer, pparams = build_proposer(c, cfg, params)
    kw.setdefault("verify_sizes", pass_sizes(c, proposer.k))
    return SpeculativeGenerator(cfg, params, proposer, pparams, tok, **kw)


def run(c) -> list[dict]:
    """Speculative decoding of every prompt in ``c.prompts_file`` (chain or tree method)."""
    validate(c)
    return decode_prompts(c, lambda cfg, params, tok: make_generator(c, cfg, params, tok))


def decode_prompts(c, make_generator) -> list[dict]:
    """Load Gemma, build the generator with ``make_generator(cfg, params, tokenizer)``, decode
    ``c.prompts_file`` in batches, print text (or JSON lines with ``stats``) and a summary."""
    from tqdm.auto import tqdm

    from tokax.console import emphasize, note, progress_disabled
    from tokax.decode.sampling import SamplingParams
    from tokax.model.config import gemma3_270m
    from tokax.model.loaders.gguf import load_gemma3
    from tokax.tokenize import load_gemma3_tokenizer

    prompts = load_prompts(c.prompts_file)
    sp = SamplingParams.make(c.temperature, c.top_k, c.top_p, c.min_p)
    quiet = c.json  # results as JSON lines on stdout; status lines and bars still go to stderr
    disable = progress_disabled(c.get("progress", None))
    t0 = time.perf_counter()
    tok = load_gemma3_tokenizer()
    lengths = [len(tok.encode(p, add_bos=True)) for p in prompts]
    check_context(c, lengths, gemma3_270m().max_seq_len)
    cfg, params = load_gemma3(c.dtype, progress=c.get("progress", None))
    gen = make_generator(cfg, params, tok)
    note("tokax.speculative", f"loaded {cfg.name} ({c.dtype}) in {time.perf_counter() - t0:.1f}s; method "
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
            if quiet:
                print(json.dumps(row, ensure_ascii=False), flush=True)
            else:
                tqdm.write(f"\n--- prompt: {p!r}\n{p}{emphasize(row['text'])}\n{st}", file=sys.stdout)
    note("tokax.speculative",
         f"{c.method}: {n_tok} tokens in {t_gen:.2f}s ({n_tok / max(t_gen, 1e-9):.1f} tokens/s, compile "
         f"included), {accepted / max(passes, 1):.2f} accepted drafts per target pass")
    return rows


def compare_methods(c, methods, cfg, params, tok, prompts, pad_to, plain_rows, t_plain, quiet=False) -> list[dict]:
    """``make demo``'s table: each speculative ``method`` (greedy, batch 1, compile excluded) on
    the prompts plain decoding just ran, against its time and output (``plain_rows``)."""
    import importlib.util
    from pathlib import Path

    from tqdm.auto import tqdm

    from tokax.decode.sampling import SamplingParams

    if c.temperature != 0:
        print("compare_methods: skipped (the comparison is greedy; set temperature=0)", file=sys.stderr)
        return []
    path = Path(__file__).resolve().parents[2] / "configs" / "speculative.py"  # the method presets
    spec = importlib.util.spec_from_file_location("_tokax_speculative_config", path)
    spec_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(spec_config)
    sp = SamplingParams.make(0.0)
    n_plain = sum(len(r["token_ids"]) for r in plain_rows)
    table = [{"method": "plain", "tok_s": n_plain / max(t_plain, 1e-9), "speedup": 1.0, "tokens_per_pass": 1.0,
              "identical": f"{len(plain_rows)}/{len(plain_rows)}"}]
    for m in methods:
        check(m in METHODS, "compare_methods", m, f"use names from {', '.join(METHODS)}")
        mc = spec_config.get_config(m)
        mc.k = int(c.get("k", mc.k))
        gen = make_generator(mc, cfg, params, tok)
        gen.generate([prompts[0]], c.max_new_tokens, sp, pad_to=pad_to)  # compile outside the timing
        dt, n, passes, same = 0.0, 0, 0, 0
        for p, ref in zip(tqdm(prompts, desc=m, unit="prompt", disable=quiet), plain_rows):
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
