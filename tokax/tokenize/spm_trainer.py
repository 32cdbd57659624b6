"""Train a small code tokenizer: byte-fallback BPE with sentencepiece, from texts."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import sentencepiece as spm

from tokax.tokenize.tokenizer import Tokenizer

__all__ = ["train_code_tokenizer"]


def train_code_tokenizer(texts: Sequence[str], vocab_size: int, path: str | os.PathLike[str]) -> Tokenizer:
    """Train a byte-fallback BPE sentencepiece model on ``texts`` and save it at ``path``.

    Ids: pad 0, unk 1, bos 2, eos 3; ``\\n`` is a piece of its own and runs
    of spaces are kept (code indentation), no text normalisation, no dummy
    prefix. Deterministic for fixed texts (one thread, no input sampling).
    Returns a ``tokax.tokenize.Tokenizer``.
    """
    lines = [ln for t in texts for ln in t.split("\n") if ln.strip()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=int(vocab_size),
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.9995,  # rare characters fall back to byte pieces
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=["\n"],
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        num_threads=1,
        minloglevel=2,
    )
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a model
    return Tokenizer(buf.getvalue())
