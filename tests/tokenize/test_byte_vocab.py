"""ByteVocab: token bytes, prefix queries and valid (canonical) encodings, each
checked against sentencepiece itself by brute force (`sp.encode` of every
candidate), on a BPE vocabulary trained here and (slow) on Gemma 3's."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import sentencepiece as spm

from tokax.testing import TOY_WORDS as WORDS
from tokax.testing import brute_valid, random_toy_texts, toy_byte_vocab, toy_spm_proto
from tokax.tokenize.byte_vocab import BYTE, SPECIAL, TEXT, ByteVocab, split_utf8, trailing_fragment

toy_model_proto = toy_spm_proto
toy_vocab = toy_byte_vocab
random_texts = random_toy_texts


def sp_of(v: ByteVocab) -> spm.SentencePieceProcessor:
    return v.sp


# ---------------------------------------------------------------------- tests
def test_token_bytes_and_kinds():
    v = toy_vocab()
    sp = sp_of(v)
    for i in range(v.vocab_size):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            assert v.kinds[i] == BYTE and v.token_bytes[i] == bytes([int(piece[3:5], 16)])
        elif sp.is_control(i) or sp.is_unknown(i):
            assert v.kinds[i] == SPECIAL and v.token_bytes[i] == b""
        else:
            assert v.kinds[i] == TEXT and v.token_bytes[i] == piece.replace("\u2581", " ").encode()
    assert v.decode(v.encode("the cat sat")) == b"the cat sat"


def test_prefix_queries_match_a_scan():
    v = toy_vocab()
    for prefix in [b"", b"t", b"th", b"the", b" ", b" c", b"\xc3", b"caf\xc3", b"zz"]:
        got = sorted(v.tokens_with_prefix(prefix).tolist())
        want = [i for i in range(v.vocab_size) if v.kinds[i] != SPECIAL and v.token_bytes[i].startswith(prefix)]
        assert got == want, prefix
    for data in [b"thereafter", b" the", b"t", b"xyz"]:
        got = sorted(v.tokens_prefix_of(data))
        want = [i for i in range(v.vocab_size) if v.kinds[i] == TEXT and data.startswith(v.token_bytes[i])]
        assert got == want, data


def test_encode_is_sentencepiece_and_round_trips():
    v = toy_vocab()
    for text in random_texts(200, seed=1):
        ids = v.encode(text)
        assert ids == v.sp.encode(text)
        assert v.decode(ids) == text.encode()
    # An incomplete character at the end: its bytes, if it can still be a fallback character.
    assert v.encode("the \u0436".encode()[:-1]) == v.sp.encode("the ") + [int(v.byte_token[0xD0])]
    assert v.encode(b"the \xff") is None  # not UTF-8
    assert v.encode("a\u2581b") is None  # sentencepiece writes a literal "▁" back as a space


def test_canonical_encodings_are_prefix_and_suffix_closed():
    """The assumption `valid_next` rests on: a contiguous part of a canonical
    encoding is the canonical encoding of its own bytes."""
    v = toy_vocab()
    for text in random_texts(150, seed=2):
        ids = v.sp.encode(text)
        for a in range(len(ids)):
            for b in range(a + 1, len(ids) + 1):
                part = v.decode(ids[a:b])
                if split_utf8(part) == (part, b""):  # whole characters only
                    assert v.sp.encode(part.decode()) == ids[a:b], (text, a, b)


def test_fallback_rule_matches_sentencepiece():
    v = toy_vocab()
    for c in ["a", "é", "ö", "ж", "\u4e2d", "\x00", "\x7f", "\u2581", "\U0001f600"]:
        enc = v.sp.encode(c)
        by_bytes = all(v.kinds[i] == BYTE for i in enc) and len(enc) == len(c.encode())
        assert v.fallback_char(c) == (by_bytes and c != "\u2581"), c


def random_contexts(v: ByteVocab, n: int, seed: int) -> list[list[int]]:
    """Valid contexts: canonical encodings of random texts cut after any token
    (so some end inside a fallback character)."""
    rng = random.Random(seed)
    out = []
    for text in random_texts(n, seed=seed):
        ids = v.sp.encode(text)
        out.append(ids[: rng.randint(1, len(ids))])
    return out


def test_valid_next_equals_brute_force():
    v = toy_vocab()
    rng = np.random.default_rng(0)
    ctxs = random_contexts(v, 60, seed=3) + [[], v.sp.encode("the"), v.sp.encode("the c"), v.sp.encode("\u4e2d")[:1]]
    for ids in ctxs:
        mask = v.valid_next([v.bos_id] + ids)
        want = np.array([brute_valid(v, ids + [t]) for t in range(v.vocab_size)])
        want[list(v.stop_ids)] = not trailing_fragment(v.decode(ids))
        assert (mask == want).all(), (ids, np.flatnonzero(mask != want))
        # is_valid agrees with the brute force too.
        for t in rng.choice(v.vocab_size, 8, replace=False):
            assert v.is_valid(ids + [int(t)]) == bool(want[t])


def test_non_joinable_pairs_split_the_encoding():
    v = toy_vocab()
    seen = 0
    for a, b in zip(random_texts(300, seed=5), random_texts(300, seed=6)):
        if not v.joinable(a[-1], b[0]):
            seen += 1
            assert v.sp.encode(a + b) == v.sp.encode(a) + v.sp.encode(b)
    assert seen > 50


def test_rejects_models_that_change_text():
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(200)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, model_type="bpe", vocab_size=300,
        byte_fallback=True, minloglevel=2,  # default: dummy prefix, nmt_nfkc normalization
    )
    with pytest.raises(ValueError, match="add_dummy_prefix"):
        ByteVocab(buf.getvalue())


@pytest.mark.slow
def test_gemma_valid_next_equals_full_reencoding():
    """Gemma 3's 262k vocabulary: the crossing-candidate shortcut gives the same
    mask as re-encoding context + token for every token."""
    from tokax.tokenize import load_gemma3_tokenizer

    tok = load_gemma3_tokenizer()
    v = ByteVocab(tok)
    text_ids = np.flatnonzero(v.kinds == TEXT)
    for text in ["    return self", "<tab", "x = ("]:
        ids = v.encode(text)
        mask = v.valid_next([v.bos_id] + ids)
        enc = v.sp.encode([text + v.token_bytes[t].decode() for t in text_ids])
        want = np.array([e == ids + [int(t)] for e, t in zip(enc, text_ids)])
        assert (mask[text_ids] == want).all(), text
