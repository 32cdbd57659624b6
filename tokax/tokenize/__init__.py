"""Tokenizers: GGUF vocabulary -> sentencepiece model, a small `Tokenizer` around it, and
`train_code_tokenizer` (a byte-fallback BPE trained on texts).

`tokax.tokenize` is a leaf package: it imports nothing from the rest of tokax.
"""

from tokax.tokenize.gguf_vocab import (
    GGUFVocab,
    build_sentencepiece_proto,
    read_gguf_metadata,
    read_gguf_vocab,
    sentencepiece_proto_from_gguf,
)
from tokax.tokenize.byte_vocab import STOP, ByteVocab
from tokax.tokenize.tokenizer import Tokenizer, load_gemma3_tokenizer
from tokax.tokenize.spm_trainer import train_code_tokenizer

__all__ = [
    "STOP",
    "ByteVocab",
    "GGUFVocab",
    "Tokenizer",
    "build_sentencepiece_proto",
    "load_gemma3_tokenizer",
    "read_gguf_metadata",
    "read_gguf_vocab",
    "sentencepiece_proto_from_gguf",
    "train_code_tokenizer",
]
