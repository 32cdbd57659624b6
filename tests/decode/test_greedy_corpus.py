"""The shipped datastore corpus of Gemma 3 270M's own greedy continuations
(``experiments/build_greedy_corpus.py``): it loads, its records follow the
builder's prompts, and (slow) they are what Gemma decodes greedily."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from tokax.data.greedy import GREEDY_CORPUS, greedy_corpus_docs
from tokax.decode.proposers.retrieval import CORPORA, build_table, corpus_table

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ASSET = os.path.join(ROOT, "tokax", "assets", GREEDY_CORPUS)


def builder():
    spec = importlib.util.spec_from_file_location("_build_greedy_corpus",
                                                  os.path.join(ROOT, "experiments", "build_greedy_corpus.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def summary():
    with open(os.path.join(ASSET, "summary.json")) as f:
        return json.load(f)


def test_shipped_corpus_loads():
    docs = greedy_corpus_docs()
    s = summary()
    assert len(docs) == s["documents"] and sum(len(d) for d in docs) == s["tokens"]
    assert all(len(d) == s["context"] + s["new_tokens"] for d in docs)
    assert all(d.dtype == np.int32 and d.min() >= 0 and d.max() < 262_144 for d in docs)


def test_corpus_names():
    assert CORPORA == ("stdlib", "greedy", "stdlib+greedy")
    with pytest.raises(ValueError, match="greedy_weight"):
        corpus_table(None, "greedy", greedy_weight=0)
    with pytest.raises(ValueError, match="use one of"):
        corpus_table(None, "no/such/dir")


def test_greedy_weight_counts_each_continuation_that_often():
    """A context seen once in the greedy corpus passes ``min_count=3`` only with weight 3, and
    then holds the continuation the corpus has after it."""
    docs = greedy_corpus_docs()
    once = build_table(docs, max_n=3, min_count=1)
    table = corpus_table(None, "greedy", max_n=3, min_count=3, greedy_weight=3)
    assert all(len(a) == len(b) for a, b in zip(table.keys, once.keys))  # the same contexts
    for a, b in zip(table.next, once.next):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_records_are_gemma_greedy_continuations():
    """The first batch of records, decoded again: same prompt contexts, and the same first 8
    greedy tokens (allowing 2 of 32 rows a flipped near-tie on a different CPU)."""
    from tokax.decode.generate import Generator
    from tokax.model.loaders.gguf import load_gemma3
    from tokax.tokenize import load_gemma3_tokenizer

    b, s = builder(), summary()
    tok = load_gemma3_tokenizer()
    prompts = b.training_prompts()[: s["batch"]]
    ids = [tok.encode(p, add_bos=True)[-b.PROMPT_TOKENS:] for p in prompts]
    docs = greedy_corpus_docs()[: s["batch"]]
    assert [d[: s["context"]].tolist() for d in docs] == [i[-s["context"]:] for i in ids]
    cfg, params = load_gemma3("float32")
    outs = b.continuations(Generator(cfg, params, eos_ids=(), pad_id=0, greedy_screen=True), ids, 8)
    same = sum(o == d[s["context"]: s["context"] + 8].tolist() for o, d in zip(outs, docs))
    assert same >= s["batch"] - 2, f"{same} of {s['batch']} rows reproduce"
