"""Byte-level log-likelihood of a text under a byte-level model: `byte_logprobs`, `bits_per_byte`.

Phan et al., "Exact Byte-Level Probabilities from Tokenized Language Models
for FIM-Tasks and Model Ensembles" (2024): the next-byte probabilities
P(x b) / P(x) telescope, so the per-byte log-probabilities of a text sum to
log P(x), the cover sum of `tokax.decode.byte_level.next_byte`: the text is
scored exactly, whatever its tokenization, and models with different
vocabularies are scored on the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tokax.decode.byte_level.protocol import NextByteModel

__all__ = ["bits_per_byte", "byte_logprobs"]


def byte_logprobs(model: NextByteModel, text: bytes | str, prompt: bytes | str = b"") -> np.ndarray:
    """``[N]`` float64: log P(x_j | prompt x_<j) for every byte x_j of `text` (natural log).

    The sum is the exact log-probability that the model's text (after the
    prompt) starts with `text`: for a `ByteLM` (renormalized), log P(x) with
    P(x) the sum of Q over the cover encodings of x (Phan et al.'s lemma),
    since the next-byte probabilities P(x b) / P(x) telescope. The end of
    text is not scored (x is a prefix, e.g. a chunk cut anywhere).
    """
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    model.reset(prompt)
    out = np.zeros(len(data), np.float64)
    for j, b in enumerate(data):
        p = model.next_byte_probs()
        out[j] = math.log(p[b]) if p[b] > 0 else -math.inf
        if j + 1 < len(data):
            model.advance(b)
    return out


def bits_per_byte(model: NextByteModel, texts: Sequence[bytes | str]) -> float:
    """-sum_j log2 P(x_j | x_<j) / (number of bytes), each text scored from its start (BOS)."""
    total, n = 0.0, 0
    for t in texts:
        lp = byte_logprobs(model, t)
        total += float(lp.sum())
        n += lp.size
    return -total / math.log(2) / max(n, 1)
