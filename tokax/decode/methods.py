"""Every speculative decoding method by name: its loop, its config block, how to build it.

    from tokax.decode import methods
    block = methods.default_block("dyspec")            # a ConfigDict: n_nodes, rounds, max_children
    block.n_nodes = 16
    gen = methods.make_generator("dyspec", block, cfg, params, tok)   # a (Tree)SpeculativeGenerator
    outs, stats = gen.generate(prompts, 64)

A method is registered once (``register``) with the loop that runs it (``chain`` or
``tree``), the defaults of its block, and a builder ``build(block, env) -> (proposer,
pparams)``. ``configs/speculative.py`` holds one block per method (``--config.method=dyspec
--config.dyspec.n_nodes=16``) plus the keys they share: the draft model the draft-model
methods run (``draft_model``: the distilled draft shipped with tokax, ``distilled:DIR``, or
``truncated``, the target's first ``layers`` layers) and the verify-pass lengths
(``verify_sizes``). The CLI job, the benchmarks, the experiments and the tests all build
methods here. Keys naming trained weights take ``'trained'`` (the file shipped in
``tokax/assets``), a path, or ``""`` (untrained); ``check_block`` names a bad value.

Adding a method: write the proposer (``tokax.decode.proposers.base``), then

    @register("my_method", loop="chain", doc="...", k=5, alpha=0.5)
    def _(b, env):
        return MyProposer(k=b.k, alpha=b.alpha), None
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from tokax.errors import ConfigError

__all__ = ["Method", "METHODS", "register", "default_block", "draft_model_block", "check_block", "build",
           "make_generator", "pass_sizes", "trained_path", "TRAINED", "VERIFY_SIZES", "method_names"]

VERIFY_SIZES = ("every", "pow2", "full")

# Keys that name trained weights: 'trained' is the copy shipped in tokax/assets/<dir>/<file>
# (made by the experiment named), else a path, "" = untrained.
TRAINED = {
    "heads": ("gemma3_270m_heads", "heads.npz"),  # experiments/train_gemma_heads.py (blockwise, medusa)
    "adapter": ("gemma3_270m_kangaroo", "adapter.npz"),  # experiments/train_kangaroo_adapter.py
    "head": ("gemma3_270m_specdec_head", "head.npz"),  # experiments/train_specdec_head.py
}


def trained_path(key: str, name: str) -> str:
    """The file a ``TRAINED`` key names: the shipped one for 'trained', else ``name``."""
    if name == "trained":
        from tokax import ASSETS_DIR

        return str(ASSETS_DIR.joinpath(*TRAINED[key]))
    return name


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    loop: str  # 'chain' (tokax.decode.speculative) or 'tree' (tokax.decode.tree_speculative)
    doc: str
    defaults: Mapping[str, Any]
    build: Callable[[Any, "Env"], tuple[Any, Any]]
    check: Callable[[Any, Callable], None] | None = None
    uses_draft: bool = False  # reads the shared draft_model block


METHODS: dict[str, Method] = {}


def register(name: str, loop: str, doc: str, uses_draft: bool = False, check: Callable | None = None, **defaults):
    """Decorator: register ``build(block, env) -> (proposer, pparams)`` as method ``name``."""
    if loop not in ("chain", "tree"):
        raise ValueError(f"method {name!r}: loop={loop!r} must be 'chain' or 'tree'")

    def deco(build):
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        METHODS[name] = Method(name, loop, doc, dict(defaults), build, check, uses_draft)
        return build

    return deco


def method_names(loop: str | None = None) -> tuple[str, ...]:
    return tuple(n for n, m in METHODS.items() if loop is None or m.loop == loop)


def _method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; use one of {', '.join(METHODS)}")
    return METHODS[name]


def default_block(name: str) -> ml_collections.ConfigDict:
    """Method ``name``'s config block with its defaults."""
    return ml_collections.ConfigDict(dict(_method(name).defaults))


def draft_model_block() -> ml_collections.ConfigDict:
    """The draft model of the draft-model methods (draft, specdec_pp, tree, dyspec, spectr)."""
    return ml_collections.ConfigDict({"name": "distilled", "layers": 4})


@dataclasses.dataclass
class Env:
    """What a builder may need besides its block: the target and the tokenizer (a datastore
    is tokenized with it), the shared draft-model block, and, given directly instead (tests,
    notebooks, a draft trained in the same session), a draft ``(cfg, params)`` and a datastore."""

    cfg: Any
    params: Any
    tokenizer: Any = None
    draft_model: Any = None
    given_draft: Any = None
    datastore: Any = None

    def draft(self):
        """(draft cfg, draft params): the one given, else the ``draft_model`` block's."""
        if self.given_draft is not None:
            return self.given_draft
        from tokax.decode.proposers.distilled import make_draft

        dm = self.draft_model if self.draft_model is not None else draft_model_block()
        return make_draft(self.cfg, self.params, dm.name, dm.layers)

    def table(self, block: Any):
        """The datastore given, else the one ``block`` describes (``retrieval_table``)."""
        return self.datastore if self.datastore is not None else retrieval_table(block, self.tokenizer)


# ----------------------------------------------------------------------------
# checks


def _checker(prefix: str):
    def check(cond, key, value, fix):
        if not cond:
            raise ConfigError(f"{prefix}{key}={value!r} is invalid: {fix}")

    return check


def check_block(name: str, block: Any, draft_model: Any = None, prefix: str = "") -> None:
    """Raise ``ConfigError`` naming ``{prefix}{name}.{key}`` for a value method ``name`` cannot
    use; ``draft_model`` is checked too for draft-model methods. ``prefix`` is how the caller
    spells a config key (the CLI job: ``--config.``)."""
    m = _method(name)
    check = _checker(f"{prefix}{name}.")
    unknown = sorted(set(block.keys()) - set(m.defaults))
    check(not unknown, unknown[0] if unknown else "", None, f"{name} has no key {unknown[:1]}; its keys: "
          f"{', '.join(m.defaults)}")
    for key in TRAINED:
        if key in block:
            path = trained_path(key, block[key])
            check(not path or os.path.exists(path), key, block[key],
                  "file does not exist ('trained' for the one shipped with tokax, \"\" for the untrained default)")
    if m.check is not None:
        m.check(block, check)
    if m.uses_draft:
        check_draft_model(draft_model if draft_model is not None else draft_model_block(), prefix)


def check_draft_model(dm: Any, prefix: str = "") -> None:
    from tokax.decode.proposers.distilled import META

    check = _checker(f"{prefix}draft_model.")
    name = dm.name
    fix = "use 'distilled' (the draft shipped with tokax), 'distilled:DIR' or 'truncated'"
    check(name in ("distilled", "truncated") or name.startswith("distilled:"), "name", name, fix)
    if name.startswith("distilled:"):
        d = name.partition(":")[2]
        check(os.path.isfile(os.path.join(d, META)), "name", name,
              f"{d!r} holds no {META}; give a directory written by experiments/distill_gemma_draft.py")
    check(dm.layers >= 1, "layers", dm.layers, "must be >= 1 (the truncated draft's layers)")


def _positive(*keys):
    def chk(b, check):
        for key in keys:
            check(b[key] >= 1, key, b[key], "must be >= 1")

    return chk


def _ngrams(b, check):
    check(b.k >= 1, "k", b.k, "must be >= 1 (maximum draft tokens per round)")
    check(1 <= b.min_ngram <= b.max_ngram, "min_ngram", b.min_ngram, f"need 1 <= min_ngram <= max_ngram={b.max_ngram}")


def _datastore(b, check):
    from tokax.decode.proposers.retrieval import CORPORA

    check(b.corpus in CORPORA or os.path.isdir(b.corpus), "corpus", b.corpus,
          f"use one of {', '.join(CORPORA)} or a directory of .py/.txt/.md files")
    if b.corpus not in CORPORA:
        check(any(fn.endswith((".py", ".txt", ".md")) for _, _, files in os.walk(b.corpus) for fn in files),
              "corpus", b.corpus, "the directory holds no .py/.txt/.md files (searched recursively); point it at some text")
    check(b.greedy_weight >= 1, "greedy_weight", b.greedy_weight, "must be >= 1")
    check(b.ngram >= 1 and b.min_count >= 1, "ngram", b.ngram, "ngram and min_count must be >= 1")
    check(0 <= b.min_conf <= 1, "min_conf", b.min_conf, "must be in [0, 1]")


# ----------------------------------------------------------------------------
# building


def build(name: str, block: Any, cfg: Any, params: Any, tokenizer: Any = None, draft_model: Any = None,
          draft: Any = None, datastore: Any = None):
    """``(proposer, pparams)`` of method ``name`` with ``block`` on target ``(cfg, params)``.
    ``draft``: a draft model ``(cfg, params)`` to use in place of ``draft_model``'s;
    ``datastore``: an ``NGramTable`` in place of the block's corpus."""
    check_block(name, block, draft_model if draft is None else None)
    return _method(name).build(block, Env(cfg, params, tokenizer, draft_model, draft, datastore))


def pass_sizes(mode: str, n: int):
    """The verify-pass lengths of ``verify_sizes`` mode for at most ``n`` drafted tokens or nodes
    (None: the loop's default, 1, 2, 4, .. and n + 1)."""
    if mode not in VERIFY_SIZES:
        raise ConfigError(f"verify_sizes={mode!r} is invalid: use one of {', '.join(VERIFY_SIZES)}")
    return {"every": tuple(range(1, n + 2)), "pow2": None, "full": (n + 1,)}[mode]


def make_generator(name: str, block: Any, cfg: Any, params: Any, tokenizer: Any = None, *, draft_model: Any = None,
                   draft: Any = None, datastore: Any = None, verify_sizes: str = "pow2", greedy_screen: bool = False,
                   **kw):
    """The generator of method ``name``: a ``SpeculativeGenerator`` (chain methods) or a
    ``TreeSpeculativeGenerator`` (token trees); ``kw`` go to its constructor. ``greedy_screen``
    is honoured for float32 targets (the screen is a bfloat16 copy); ``draft`` and
    ``datastore`` as in ``build``."""
    proposer, pparams = build(name, block, cfg, params, tokenizer, draft_model, draft, datastore)
    kw.setdefault("greedy_screen", bool(greedy_screen) and cfg.dtype == "float32")
    if METHODS[name].loop == "tree":
        from tokax.decode.tree_speculative import TreeSpeculativeGenerator

        if proposer.verify_sizes is not None:  # a proposer that puts its valid nodes first
            kw.setdefault("verify_sizes", pass_sizes(verify_sizes, proposer.n_nodes))
        return TreeSpeculativeGenerator(cfg, params, proposer, pparams, tokenizer, **kw)
    from tokax.decode.speculative import SpeculativeGenerator

    kw.setdefault("verify_sizes", pass_sizes(verify_sizes, proposer.k))
    return SpeculativeGenerator(cfg, params, proposer, pparams, tokenizer, **kw)


def _load(path: str):
    from tokax.decode.proposers import load_params

    return load_params(path)


@functools.lru_cache(maxsize=4)
def _corpus_table(tokenizer, corpus: str, max_n: int, min_count: int, greedy_weight: int):
    from tokax.decode.proposers.retrieval import corpus_table

    return corpus_table(tokenizer, corpus, max_n=max_n, min_count=min_count, greedy_weight=greedy_weight)


def retrieval_table(block: Any, tokenizer: Any = None):
    """The n-gram datastore of a retrieval block (``corpus``, ``ngram``, ``min_count``,
    ``greedy_weight``), built once per process for each setting (Gemma's tokenizer by default)."""
    if tokenizer is None:
        from tokax.tokenize import load_gemma3_tokenizer

        tokenizer = load_gemma3_tokenizer()
    return _corpus_table(tokenizer, block.corpus, block.ngram, block.min_count, block.greedy_weight)


# ----------------------------------------------------------------------------
# chain methods

_DATASTORE = dict(corpus="stdlib+greedy", greedy_weight=3, ngram=3, min_count=3, min_conf=0.15)


@register("prompt_lookup", "chain", "continue the latest match of the last tokens in the row's own context",
          check=_ngrams, k=5, max_ngram=3, min_ngram=1)
def _(b, env):
    from tokax.decode.proposers import PromptLookupProposer

    return PromptLookupProposer(k=b.k, max_ngram=b.max_ngram, min_ngram=b.min_ngram), None


def _retrieval_check(b, check):
    _ngrams(b, check)
    _datastore(b, check)


@register("retrieval", "chain", "prompt lookup, else an n-gram datastore of a corpus (REST-style)",
          check=_retrieval_check, k=5, max_ngram=3, min_ngram=1, prompt_lookup=True, **_DATASTORE)
def _(b, env):
    from tokax.decode.proposers import RetrievalProposer

    prop = RetrievalProposer(k=b.k, max_ngram=b.max_ngram, min_ngram=b.min_ngram, min_conf=b.min_conf,
                             prompt_lookup=b.prompt_lookup)  # prompt_lookup=False: the datastore alone
    return prop, env.table(b)


def _anpd_check(b, check):
    _ngrams(b, check)
    check(b.min_ngram <= b.init_ngram <= b.max_ngram, "init_ngram", b.init_ngram, "must be in [min_ngram, max_ngram]")


@register("anpd", "chain", "adaptive n-gram parallel decoding (n-gram size and draft length adapt online)",
          check=_anpd_check, k=5, max_ngram=3, min_ngram=1, init_ngram=2)
def _(b, env):
    from tokax.decode.proposers import ANPDProposer

    return ANPDProposer(k=b.k, max_ngram=b.max_ngram, min_ngram=b.min_ngram, init_ngram=b.init_ngram), None


@register("draft", "chain", "a small draft model (draft_model) on the target's vocabulary", uses_draft=True,
          check=_positive("k"), k=5)
def _(b, env):
    from tokax.decode.proposers import DraftModelProposer

    dcfg, dparams = env.draft()
    return DraftModelProposer(dcfg, k=b.k), dparams


def _kangaroo_check(b, check):
    check(b.k >= 1, "k", b.k, "must be >= 1")
    check(0 <= b.threshold <= 1, "threshold", b.threshold, "must be in [0, 1]")
    check(b.layers >= 1, "layers", b.layers, "must be >= 1 (shallow layers shared with the target)")


@register("kangaroo", "chain", "the target's first layers + an adapter + the LM head; stops when unsure",
          check=_kangaroo_check, k=5, layers=2, threshold=0.6, adapter="trained")
def _(b, env):
    import jax

    from tokax.decode.proposers import KangarooProposer, kangaroo

    if not 1 <= b.layers < env.cfg.n_layers:
        raise ConfigError(f"kangaroo.layers={b.layers} is invalid: must be in [1, {env.cfg.n_layers - 1}]")
    prop = KangarooProposer.make(env.cfg, b.layers, k=b.k, threshold=b.threshold)
    if not b.adapter:
        return prop, kangaroo.init_adapter(env.cfg, b.layers, jax.random.PRNGKey(0), identity=True)
    return prop, kangaroo.load_adapter(trained_path("adapter", b.adapter), env.cfg, env.params, b.layers)


def _specdec_check(b, check):
    check(b.k >= 1, "k", b.k, "must be >= 1")
    check(0 <= b.threshold <= 1, "threshold", b.threshold, "must be in [0, 1]")
    check(0 < b.prior < 1, "prior", b.prior, "must be in (0, 1)")


@register("specdec_pp", "chain", "the draft model + an acceptance head that ends a round before a likely "
          "rejection (SpecDec++)", uses_draft=True, check=_specdec_check, k=5, threshold=0.5, head="trained",
          prior=0.8)
def _(b, env):
    import jax

    from tokax.decode.proposers import SpecDecPPProposer, specdec_pp

    dcfg, dparams = env.draft()
    prop = SpecDecPPProposer(cfg=dcfg, k=b.k, threshold=b.threshold)
    if b.head:
        name = (env.draft_model or draft_model_block()).name
        if b.head == "trained" and name != "distilled":
            raise ConfigError(f"specdec_pp.head='trained' is invalid: the shipped head was trained on draft_model "
                              f"'distilled', not {name!r} (give a .npz, or \"\")")
        head = _load(trained_path("head", b.head))
    else:
        head = specdec_pp.init_head(dcfg.d_model, jax.random.PRNGKey(0), prior=b.prior)
    return prop, {"model": dparams, "head": head}


@register("lookahead", "chain", "an n-gram pool filled from the target's own Jacobi guesses (training free)",
          check=_positive("k", "ngram", "buckets", "slots"), k=5, ngram=3, buckets=1024, slots=4)
def _(b, env):
    from tokax.decode.proposers import LookaheadProposer

    return LookaheadProposer(k=b.k, ngram=b.ngram, pool_buckets=b.buckets, pool_slots=b.slots), None


@register("blockwise", "chain", "k heads on the target's hidden state (blockwise parallel decoding)",
          check=_positive("k"), k=5, heads="trained", sample_drafts=True)
def _(b, env):
    from tokax.decode.proposers import BlockwiseProposer, blockwise

    heads = _load(trained_path("heads", b.heads)) if b.heads else blockwise.init_heads(env.cfg.d_model, b.k)
    # k is the most tokens a round drafts: a heads file with fewer heads drafts fewer
    return BlockwiseProposer(k=min(b.k, int(heads["w"].shape[0])), sample_drafts=b.sample_drafts), heads


# ----------------------------------------------------------------------------
# token trees


def _branching(b, check):
    check(len(b.branching) >= 1 and all(x >= 1 for x in b.branching), "branching", tuple(b.branching),
          "needs >= 1 children per depth")


@register("tree", "tree", "a fixed tree template (branching children per depth) filled from the draft model",
          uses_draft=True, check=_branching, branching=(3, 2, 1))
def _(b, env):
    from tokax.decode.proposers import DraftTreeProposer

    dcfg, dparams = env.draft()
    return DraftTreeProposer.from_branching(dcfg, tuple(b.branching)), dparams


@register("dyspec", "tree", "a tree grown by draft path probability under a node budget (DySpec)",
          uses_draft=True, check=_positive("n_nodes", "rounds", "max_children"), n_nodes=12, rounds=4, max_children=4)
def _(b, env):
    from tokax.decode.proposers import DySpecProposer

    dcfg, dparams = env.draft()
    return DySpecProposer(dcfg, n_nodes=b.n_nodes, rounds=b.rounds, max_children=b.max_children), dparams


@register("spectr", "tree", "k i.i.d. draft chains, k-sequential selection (SpecTr)", uses_draft=True,
          check=_positive("k", "length"), k=3, length=4)
def _(b, env):
    from tokax.decode.proposers import SpecTrProposer

    dcfg, dparams = env.draft()
    return SpecTrProposer(dcfg, k=b.k, length=b.length), dparams


def _recycling_check(b, check):
    _branching(b, check)
    check(b.table_k >= max(b.branching), "table_k", b.table_k, f"must be >= max(branching)={max(b.branching)}")


@register("token_recycling", "tree", "an adjacency table of the target's past top-k, read along a template",
          check=_recycling_check, branching=(3, 2, 1), table_k=4)
def _(b, env):
    from tokax.decode.proposers import TokenRecyclingProposer, template_from_branching

    return TokenRecyclingProposer(env.cfg.vocab_size, k=b.table_k,
                                  parents=template_from_branching(tuple(b.branching))), None


def _medusa_check(b, check):
    check(len(b.topk) >= 1 and all(t >= 1 for t in b.topk), "topk", tuple(b.topk), "needs one top-k >= 1 per head")
    check(bool(b.heads), "heads", b.heads, "medusa needs trained heads ('trained', or a .npz from "
          "experiments/train_gemma_heads.py)")


@register("medusa", "tree", "the cartesian top-k tree of the blockwise heads (Medusa)", check=_medusa_check,
          topk=(3, 2, 1), heads="trained")
def _(b, env):
    from tokax.decode.proposers import MedusaTreeProposer

    return MedusaTreeProposer(topk=tuple(b.topk)), _load(trained_path("heads", b.heads))


def _retrieval_tree_check(b, check):
    check(1 <= b.min_ngram <= b.max_ngram, "min_ngram", b.min_ngram, f"need 1 <= min_ngram <= max_ngram={b.max_ngram}")
    _datastore(b, check)
    br = tuple(b.branches)
    check(len(br) >= 1 and min(br) >= 1 and max(br) == br[0], "branches", br,
          "needs >= 1 node per candidate, the first the largest (it is also the draft length)")
    check(0 <= b.alt_min_conf <= 1, "alt_min_conf", b.alt_min_conf, "must be in [0, 1]")


@register("retrieval_tree", "tree", "prompt lookup, the datastore's chain and its runner-up merged into one "
          "token tree (REST-style)", check=_retrieval_tree_check, branches=(5, 1, 1), max_ngram=3, min_ngram=1,
          alt_min_conf=0.1, **_DATASTORE)
def _(b, env):
    from tokax.decode.proposers import RetrievalTreeProposer

    prop = RetrievalTreeProposer(branches=tuple(b.branches), max_ngram=b.max_ngram, min_ngram=b.min_ngram,
                                 min_conf=b.min_conf, alt_min_conf=b.alt_min_conf)
    return prop, env.table(b)
