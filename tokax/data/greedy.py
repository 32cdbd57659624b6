"""The greedy corpus: Gemma 3 270M's own greedy continuations of training-split code.

Shipped as ``tokax/assets/gemma3_270m_greedy_code`` (built by
``experiments/build_greedy_corpus.py``): for each prompt of
``tokax.data.stdlib.training_function_prefixes()``, in order, the last ``context`` tokens
the model read and the 64 tokens it then wrote greedily. Retrieval datastores count its
n-grams; drafts and acceptance heads train on it to predict what this target writes, in
the contexts it writes them (``greedy_code_pairs``, ``continuation_batch``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from tokax import ASSETS_DIR
from tokax.data.stdlib import training_function_prefixes

__all__ = ["GREEDY_CORPUS", "greedy_corpus_docs", "greedy_code_pairs", "continuation_batch"]

GREEDY_CORPUS = "gemma3_270m_greedy_code"  # tokax/assets/<this>/tokens.npz


def greedy_corpus_docs(name: str = GREEDY_CORPUS) -> list[np.ndarray]:
    """The shipped greedy continuations of Gemma 3 270M on training-split code
    (``experiments/build_greedy_corpus.py``), one token array per continuation."""
    path = ASSETS_DIR / name / "tokens.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run experiments/build_greedy_corpus.py")
    with np.load(path) as z:
        tokens, lengths = z["tokens"], z["lengths"]
    return np.split(tokens, np.cumsum(lengths)[:-1])


def greedy_code_pairs(tokenizer: Any, prompt_tokens: int = 256) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(prompt ids, continuation ids)`` for every document of the shipped greedy corpus:
    the prompt as Gemma 3 270M read it (``[bos] + text``, its last ``prompt_tokens``) and the
    64 tokens it then wrote greedily. Training data for drafts and acceptance heads that
    should predict what this target writes, in the contexts it writes them. Checks that each
    document's stored context ends its prompt (the corpus and the prompts agree)."""
    docs = greedy_corpus_docs()
    ctx = int(json.loads((ASSETS_DIR / GREEDY_CORPUS / "summary.json").read_text())["context"])
    prompts = training_function_prefixes()[: len(docs)]
    out = []
    for i, (text, doc) in enumerate(zip(prompts, docs)):
        ids = np.asarray(tokenizer.encode(text, add_bos=True)[-prompt_tokens:], np.int32)
        if not np.array_equal(ids[-ctx:], doc[:ctx]):
            raise ValueError(f"greedy corpus document {i} does not continue prompt {i}: "
                             "the corpus and the stdlib on this machine disagree")
        out.append((ids, np.asarray(doc[ctx:], np.int32)))
    return out


def continuation_batch(pairs: Sequence[tuple[np.ndarray, np.ndarray]], length: int | None = None):
    """Arrays for a batch of ``(prompt, continuation)`` pairs (``greedy_code_pairs``): tokens
    ``[B, L]`` (prompt then continuation, right-padded with 0), real lengths ``[B]``, the
    position before each continuation token ``at [B, C]`` (where a draft predicts it) and the
    continuation tokens ``[B, C]``. ``L`` = ``length`` or the longest pair."""
    C = len(pairs[0][1])
    L = length or max(len(p) + len(c) for p, c in pairs)
    toks = np.zeros((len(pairs), L), np.int32)
    lengths = np.zeros((len(pairs),), np.int32)
    at = np.zeros((len(pairs), C), np.int32)
    for b, (p, c) in enumerate(pairs):
        if len(c) != C:
            raise ValueError("continuations of different lengths in one batch")
        toks[b, :len(p)], toks[b, len(p):len(p) + C] = p, c
        lengths[b] = len(p) + C
        at[b] = len(p) - 1 + np.arange(C)
    return toks, lengths, at, np.stack([np.asarray(c, np.int32) for _, c in pairs])
