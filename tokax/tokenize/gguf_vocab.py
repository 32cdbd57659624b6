"""GGUF tokenizer metadata -> a sentencepiece BPE `ModelProto`.

A GGUF file carries its tokenizer as metadata (llama.cpp key names):
`tokenizer.ggml.tokens` (piece strings), `.scores` (float32), `.token_type`
(llama.cpp `TokenType`: 1 NORMAL, 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED,
5 UNUSED, 6 BYTE) and the special ids. For `tokenizer.ggml.model == "llama"`
that is a sentencepiece vocabulary, so we rebuild a sentencepiece model from it
and need no tokenizer download.

Target semantics: the tokenizer HF transformers builds from the same file
(`AutoTokenizer.from_pretrained(dir, gguf_file=name)`), which is a byte-fallback
BPE whose merge (l, r) has priority by the position of the token `l + r` in the
file (lower id merges first), with `" "` -> `"▁"` as the only normalization and
the control / user-defined tokens matched whole in the raw text first.
Sentencepiece's BPE (`bpe_model.cc`) merges the adjacent pair whose
concatenation has the highest score, leftmost first on ties, so it reproduces
that when the scores order the mergeable pieces by id. (HF also orders two
splits of one piece, longer left part first; no input where that differs from
leftmost-first turned up, in the tests or in 90k random strings over tiny
vocabularies.) Two things in Gemma's file need care:

1. Runs of spaces ("  ", ..., 31 spaces) are stored as USER_DEFINED tokens
   spelled with real spaces and score -1000. HF respells them "▁▁"... and
   reaches them through ordinary merges (they are not matched whole): 40
   spaces encode as [16 spaces][24 spaces], not [31][9]. So they become NORMAL
   pieces spelled with "▁", scored above every other NORMAL piece in id order.
2. `<unk>` is typed CONTROL in the file; sentencepiece needs exactly one
   UNKNOWN piece, so the `unknown_token_id` piece becomes UNKNOWN.

Not handled because Gemma's file has none: UNUSED tokens (sentencepiece splits
a merged UNUSED piece back into its parts, HF and llama.cpp keep it) and
`add_space_prefix=True` (rejected).

The metadata reader is our own: `gguf.GGUFReader` builds a numpy view per
array element (~0.8M for this vocabulary) and takes 15-30 s here; reading just
the key-value section with `struct` takes well under a second.
"""

from __future__ import annotations

import dataclasses
import functools
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUF_MAGIC, GGUFValueType, TokenType
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

__all__ = [
    "GGUFVocab",
    "read_gguf_metadata",
    "read_gguf_vocab",
    "build_sentencepiece_proto",
    "sentencepiece_proto_from_gguf",
]

_Piece = sp_pb2.ModelProto.SentencePiece

# Fixed-size GGUF value types -> struct format character (without byte order).
_SCALAR_FORMAT = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}

# llama.cpp token type -> sentencepiece piece type (the numbering coincides,
# spelled out so a change on either side shows up here).
_PIECE_TYPE = {
    TokenType.NORMAL: _Piece.NORMAL,
    TokenType.UNKNOWN: _Piece.UNKNOWN,
    TokenType.CONTROL: _Piece.CONTROL,
    TokenType.USER_DEFINED: _Piece.USER_DEFINED,
    TokenType.UNUSED: _Piece.UNUSED,
    TokenType.BYTE: _Piece.BYTE,
}

SPACE_SYMBOL = "\u2581"  # sentencepiece's escaped space, "▁"


def read_gguf_metadata(path: str | os.PathLike[str], prefix: str = "") -> dict[str, Any]:
    """Key-value metadata of a GGUF file (v2/v3), only keys starting with `prefix`.

    Scalars come back as Python values, strings as `str`, arrays of numbers as
    numpy arrays, arrays of strings as lists of `str`. Tensor infos and data are
    not read. Layout: magic u32, version u32, n_tensors u64, n_kv u64, then per
    key `string key, u32 type, value`, a string being `u64 length, utf-8 bytes`.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            return _parse_kv(buf, prefix)
        finally:
            buf.release()


def _parse_kv(buf: memoryview, prefix: str) -> dict[str, Any]:
    (magic,) = struct.unpack_from("<I", buf, 0)
    if magic != GGUF_MAGIC:
        raise ValueError(f"not a GGUF file (magic {magic:#x})")
    (version,) = struct.unpack_from("<I", buf, 4)
    # A big-endian file stores the version byte-swapped: 3 reads as 0x03000000.
    bo = "<" if version & 0xFFFF else ">"
    (version,) = struct.unpack_from(bo + "I", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    _, n_kv = struct.unpack_from(bo + "QQ", buf, 8)
    off = 24
    u64 = struct.Struct(bo + "Q")
    u32 = struct.Struct(bo + "I")

    def read_str(off: int) -> tuple[str, int]:
        (n,) = u64.unpack_from(buf, off)
        off += 8
        return bytes(buf[off : off + n]).decode("utf-8"), off + n

    def skip_str(off: int) -> int:
        return off + 8 + u64.unpack_from(buf, off)[0]

    def read_value(vtype: int, off: int, keep: bool) -> tuple[Any, int]:
        if vtype == GGUFValueType.STRING:
            return read_str(off) if keep else (None, skip_str(off))
        if vtype == GGUFValueType.ARRAY:
            (etype,) = u32.unpack_from(buf, off)
            (n,) = u64.unpack_from(buf, off + 4)
            off += 12
            if etype in _SCALAR_FORMAT:
                dtype = np.dtype(bo + _SCALAR_FORMAT[etype])
                end = off + n * dtype.itemsize
                arr = np.frombuffer(buf[off:end], dtype=dtype).astype(dtype.newbyteorder("="))
                return (arr if keep else None), end
            out = [] if keep else None
            for _ in range(n):
                v, off = read_value(etype, off, keep)
                if keep:
                    out.append(v)
            return out, off
        fmt = bo + _SCALAR_FORMAT[GGUFValueType(vtype)]
        (v,) = struct.unpack_from(fmt, buf, off)
        return v, off + struct.calcsize(fmt)

    out: dict[str, Any] = {}
    for _ in range(n_kv):
        key, off = read_str(off)
        (vtype,) = u32.unpack_from(buf, off)
        keep = key.startswith(prefix)
        value, off = read_value(vtype, off + 4, keep)
        if keep:
            out[key] = value
    return out


@dataclasses.dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer a GGUF file describes, as stored (no respelling)."""

    model: str  # tokenizer.ggml.model, "llama" for sentencepiece vocabularies
    tokens: tuple[str, ...]  # [V]
    scores: np.ndarray  # [V] float32
    token_types: np.ndarray  # [V] int32, llama.cpp TokenType values
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_space_prefix: bool

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)


def read_gguf_vocab(path: str | os.PathLike[str]) -> GGUFVocab:
    """Read the `tokenizer.ggml.*` metadata of a GGUF file."""
    md = read_gguf_metadata(path, prefix="tokenizer.")
    tokens = tuple(md["tokenizer.ggml.tokens"])
    n = len(tokens)
    scores = np.asarray(md.get("tokenizer.ggml.scores", np.zeros(n)), dtype=np.float32)
    types = np.asarray(md.get("tokenizer.ggml.token_type", np.full(n, TokenType.NORMAL)), dtype=np.int32)
    if scores.shape != (n,) or types.shape != (n,):
        raise ValueError(f"GGUF tokenizer arrays disagree: {n} tokens, {scores.shape} scores, {types.shape} types")

    def opt_id(key: str) -> int | None:
        v = md.get(f"tokenizer.ggml.{key}")
        return None if v is None else int(v)

    return GGUFVocab(
        model=str(md.get("tokenizer.ggml.model", "")),
        tokens=tokens,
        scores=scores,
        token_types=types,
        bos_id=opt_id("bos_token_id"),
        eos_id=opt_id("eos_token_id"),
        unk_id=opt_id("unknown_token_id"),
        pad_id=opt_id("padding_token_id"),
        # llama.cpp adds BOS for sentencepiece vocabularies that do not say otherwise.
        add_bos=bool(md.get("tokenizer.ggml.add_bos_token", True)),
        add_space_prefix=bool(md.get("tokenizer.ggml.add_space_prefix", True)),
    )


def _is_space_run(token: str) -> bool:
    """A USER_DEFINED token made only of spaces: HF respells it with "▁" and merges to it."""
    return bool(token) and not token.strip(" ")


def build_sentencepiece_proto(vocab: GGUFVocab) -> sp_pb2.ModelProto:
    """A sentencepiece BPE model that encodes like HF's tokenizer for this GGUF vocabulary.

    Piece i is token i, so ids agree. Types map one to one except for the two
    fixes in the module docstring. Scores: sentencepiece merges the pair whose
    concatenation has the highest score, HF the one whose token id is lowest;
    the NORMAL scores of a llama.cpp file fall strictly with the id, so they are
    kept, and the respelled space runs get scores above them, falling with the
    id (score_i = s_max + n_runs - rank_i). If the file's NORMAL scores did not
    fall with the id, every mergeable piece gets score -id instead.
    """
    if vocab.model != "llama":
        raise ValueError(f"only sentencepiece ('llama') GGUF vocabularies are supported, got {vocab.model!r}")
    if vocab.add_space_prefix:
        # HF prepends nothing for Gemma; a dummy prefix would need a "▁" prepended
        # to each raw-text segment, which we have not checked against HF.
        raise NotImplementedError("GGUF vocabularies with add_space_prefix=True are not supported")
    tokens = list(vocab.tokens)
    types = [TokenType(int(t)) for t in vocab.token_types]
    scores = vocab.scores.astype(np.float64)
    v = len(tokens)

    piece_types = [_PIECE_TYPE[t] for t in types]
    if vocab.unk_id is not None:
        piece_types[vocab.unk_id] = _Piece.UNKNOWN
    if piece_types.count(_Piece.UNKNOWN) != 1:
        raise ValueError("sentencepiece needs exactly one UNKNOWN piece")

    runs = [i for i in range(v) if types[i] == TokenType.USER_DEFINED and _is_space_run(tokens[i])]
    for i in runs:
        tokens[i] = tokens[i].replace(" ", SPACE_SYMBOL)
        piece_types[i] = _Piece.NORMAL

    normal = np.array([i for i in range(v) if types[i] in (TokenType.NORMAL, TokenType.UNUSED)], dtype=np.int64)
    new_scores = scores.copy()
    scores_follow_ids = bool(np.all(np.diff(scores[normal]) < 0)) if len(normal) > 1 else True
    runs_first = not runs or not len(normal) or max(runs) < normal.min()
    if scores_follow_ids and runs_first:
        top = float(scores[normal].max()) if len(normal) else 0.0
        for rank, i in enumerate(runs):
            new_scores[i] = top + len(runs) - rank
    else:
        for i in np.concatenate([normal, np.array(runs, dtype=np.int64)]):
            new_scores[i] = -float(i)
    # float32 must keep the order: ids below 2**24 are exact.
    ordered = sorted(list(normal) + runs)
    s32 = new_scores.astype(np.float32)[ordered]
    if len(ordered) > 1 and not np.all(np.diff(s32) < 0):
        raise ValueError("merge priorities do not survive float32 scores")

    proto = sp_pb2.ModelProto()
    ts = proto.trainer_spec
    ts.model_type = sp_pb2.TrainerSpec.BPE
    ts.vocab_size = v
    ts.byte_fallback = True
    # Training-time flags, for the record only (BPE encoding reads none of
    # them): Gemma's vocabulary has no piece joining an ASCII digit to anything
    # (digits were split) and has pieces made of spaces only.
    ts.split_digits = True
    ts.allow_whitespace_only_pieces = True
    ts.max_sentencepiece_length = max(len(t) for t in tokens)
    for field, idx in (("unk", vocab.unk_id), ("bos", vocab.bos_id), ("eos", vocab.eos_id), ("pad", vocab.pad_id)):
        setattr(ts, f"{field}_id", -1 if idx is None else idx)
        if idx is not None:
            setattr(ts, f"{field}_piece", tokens[idx])
    ns = proto.normalizer_spec
    ns.name = "identity"  # no precompiled charsmap: text is used as is
    ns.add_dummy_prefix = False
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True  # " " -> "▁", as HF's Replace(" ", "▁")

    for tok, ptype, score in zip(tokens, piece_types, new_scores.astype(np.float32).tolist()):
        p = proto.pieces.add()
        p.piece = tok
        p.score = score
        p.type = ptype
    return proto


@functools.lru_cache(maxsize=4)
def _proto_bytes_cached(path: str, size: int, mtime_ns: int) -> bytes:
    return build_sentencepiece_proto(read_gguf_vocab(path)).SerializeToString()


def sentencepiece_proto_from_gguf(path: str | os.PathLike[str]) -> bytes:
    """Serialized sentencepiece `ModelProto` for a GGUF file, cached per (path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    return _proto_bytes_cached(str(p), st.st_size, st.st_mtime_ns)
