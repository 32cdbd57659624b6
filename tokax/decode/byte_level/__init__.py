"""Exact byte-level probabilities of tokenized language models, and what they allow.

Phan et al., "Exact Byte-Level Probabilities from Tokenized Language Models
for FIM-Tasks and Model Ensembles" (2024). By the Byte-Token Representation
Lemma, the probability that a tokenized model's text starts with the bytes
`x` is the sum of Q(c) over the *cover encodings* c of x: the valid
(canonical-prefix) token sequences whose bytes, but for the last token, are
a proper prefix of x, and whose bytes with it start with x. The next-byte
distribution is P(x b) / P(x), plus P(x, end) = Q(encode(x) + [EOS]) at
index `STOP` = 256. The rules of the sum (which sequences count, the
renormalized and the paper's unnormalized Q) are in `next_byte`'s docstring.

One module per job; each imports only the modules above it in its column:

    validity    which next tokens keep a sequence canonical (`BPEJunctions`, `bpe_junctions`)
      trie      model states along a trie of token sequences over one KV cache (`TokenTrie`)
        next_byte   the exact next-byte distributions, the cover sum (`ByteLM`)

    protocol    the interface of a byte-level model (`NextByteModel`)
      mixture   byte-by-byte mixtures, fixed or Bayesian weights (`ByteMixture`)
      scoring   exact byte-level log-likelihood (`byte_logprobs`, `bits_per_byte`)
      sampling  greedy or tempered byte sampling (`sample_bytes`, `ByteSample`)

A `ByteLM` is a `NextByteModel` by its methods alone, so the second column
never imports the first: sampling, scoring and mixing work on any model over
bytes, e.g. a `ByteMixture` of `ByteLM`s with different vocabularies.
"""

from __future__ import annotations

from tokax.decode.byte_level.mixture import ByteMixture
from tokax.decode.byte_level.next_byte import ByteLM
from tokax.decode.byte_level.protocol import NextByteModel
from tokax.decode.byte_level.sampling import ByteSample, sample_bytes
from tokax.decode.byte_level.scoring import bits_per_byte, byte_logprobs
from tokax.decode.byte_level.trie import TokenTrie
from tokax.decode.byte_level.validity import BPEJunctions, bpe_junctions
from tokax.tokenize.byte_vocab import STOP

__all__ = ["STOP", "BPEJunctions", "ByteLM", "ByteMixture", "ByteSample", "NextByteModel", "TokenTrie", "bits_per_byte", "byte_logprobs", "sample_bytes"]
