"""A sentencepiece vocabulary seen as byte strings, and its valid (canonical) encodings.

Byte-level work on a tokenized model (`tokax.decode.byte_level`, Phan et al.,
"Exact Byte-Level Probabilities from Tokenized Language Models") needs three
things from the tokenizer, all here:

1. Every token as the bytes it writes: a NORMAL / USER_DEFINED piece is its
   text with "▁" read as a space, a byte-fallback piece `<0xNN>` is the single
   byte NN, and CONTROL / UNKNOWN / UNUSED pieces (`<bos>`, `<eos>`,
   `<start_of_turn>`, ...) write nothing: they are not part of the byte stream.
2. Prefix queries: all tokens whose bytes start with `b` (a range of the
   sorted byte strings) and all tokens whose bytes are a prefix of `b`.
3. Validity. The canonical encoding of a byte string is what the tokenizer
   writes for it: `sp.encode` of the text (sentencepiece alone, i.e. HF with
   `split_special_tokens=True`; control-token text is plain text), with a
   trailing incomplete UTF-8 character allowed when it is the start of a
   byte-fallback character. A token sequence is *valid* when it is a prefix
   of some canonical encoding. The lemma of Phan et al. sums over valid
   encodings only, so `valid_next(ids)` -- the next tokens that keep `ids`
   valid -- is what byte-level sampling asks for at every model call.

How `valid_next` decides, exactly and without re-encoding the vocabulary each
time. For sentencepiece BPE (with user-defined pieces matched whole), a
contiguous part of a canonical encoding is the canonical encoding of its bytes
(merges never cross the final token boundaries, and the whole-match scan is
left to right), so for a valid context `s` and a text token `t`:

* `t` must be canonical on its own (`encode(bytes(t)) == [t]`);
* if the canonical encoding of `bytes(s) + bytes(t)` has a token boundary
  where `t` starts, it equals `s + [t]`; otherwise one of its tokens spans the
  junction, so some piece `p = u + v` has `u` a suffix of `bytes(s)` and `v` a
  prefix of `bytes(t)`. Only tokens `t` that start with such a `v` (the
  *crossing candidates*) are re-encoded, together with enough of the end of
  `s` to hold `u` and any user-defined piece that could span the junction;
  every other canonical token is valid after `s`.
* a byte-fallback token continues a character only when that character (or
  some completion of it) is not a one-character piece, i.e. sentencepiece
  would fall back to bytes for it; the vocabulary check at construction makes
  sure every character used in a piece is itself a piece, so fallback
  characters never join a neighbour.

Masks are cached per context tail. The assumptions (prefix/suffix closure of
canonical encodings, the fallback rule) are checked against `sp.encode` in
tests/tokenize/test_byte_vocab.py, on a trained toy vocabulary and on Gemma 3.

`tokax.tokenize` is a leaf package: nothing here imports the rest of tokax.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Sequence
from typing import Any

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

__all__ = ["ByteVocab", "STOP", "TEXT", "BYTE", "SPECIAL", "split_utf8", "trailing_fragment"]

_Piece = sp_pb2.ModelProto.SentencePiece
SPACE_SYMBOL = "\u2581"  # "▁"
STOP = 256  # index of the end-of-text outcome in a next-byte distribution [257]

# Token kinds.
TEXT, BYTE, SPECIAL = 0, 1, 2


def _utf8_fragment_table() -> tuple[np.ndarray, np.ndarray]:
    """Every proper prefix of a UTF-8 encoded scalar value, with how many
    characters complete it: (keys [K] int64, counts [K] int64), a key being
    ``len << 24 | b0 << 16 | b1 << 8 | b2`` (unused bytes 0)."""
    cp = np.arange(0x110000, dtype=np.int64)
    cp = cp[(cp < 0xD800) | (cp > 0xDFFF)]  # surrogates are not characters
    keys = []
    two = cp[(cp >= 0x80) & (cp < 0x800)]
    keys.append((1 << 24) | ((0xC0 | (two >> 6)) << 16))
    three = cp[(cp >= 0x800) & (cp < 0x10000)]
    b0, b1 = 0xE0 | (three >> 12), 0x80 | ((three >> 6) & 0x3F)
    keys += [(1 << 24) | (b0 << 16), (2 << 24) | (b0 << 16) | (b1 << 8)]
    four = cp[cp >= 0x10000]
    b0, b1, b2 = 0xF0 | (four >> 18), 0x80 | ((four >> 12) & 0x3F), 0x80 | ((four >> 6) & 0x3F)
    keys += [(1 << 24) | (b0 << 16), (2 << 24) | (b0 << 16) | (b1 << 8), (3 << 24) | (b0 << 16) | (b1 << 8) | b2]
    return np.unique(np.concatenate(keys), return_counts=True)


def _fragment_key(frag: bytes) -> int:
    b = frag + b"\0\0"
    return (len(frag) << 24) | (b[0] << 16) | (b[1] << 8) | b[2]


def split_utf8(data: bytes) -> tuple[bytes, bytes] | None:
    """``(complete, fragment)``: the longest valid UTF-8 prefix and the
    incomplete character after it, or None when `data` is not valid UTF-8
    followed by at most the start of one character."""
    try:
        data.decode("utf-8")
        return data, b""
    except UnicodeDecodeError as e:
        if e.reason != "unexpected end of data" or e.end != len(data):
            return None
        return data[: e.start], data[e.start :]


def trailing_fragment(data: bytes) -> bytes:
    """The incomplete UTF-8 character at the end of `data` (b"" if it ends on a
    character boundary). Only the last three bytes are looked at."""
    for k in range(1, min(3, len(data)) + 1):
        b = data[-k]
        if b & 0xC0 == 0x80:  # continuation byte: keep looking for the lead
            continue
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return data[-k:] if need > k else b""
    return b""


class ByteVocab:
    """Byte strings of a sentencepiece BPE vocabulary, prefix queries, and valid encodings.

    Built from a `tokax.tokenize.Tokenizer` (or anything with `model_proto`
    and `sp`), a serialized ModelProto or a ModelProto. The model must write
    text as is: no dummy-prefix space, no whitespace folding, no character
    normalization, spaces escaped as "▁" (Gemma's tokenizer is such a model),
    so that decoding a canonical encoding gives back the exact bytes.
    `stop_ids`: special tokens that end the text (default: the EOS id).
    """

    def __init__(self, tokenizer: Any, stop_ids: Sequence[int] | None = None, cache_size: int = 1024) -> None:
        if hasattr(tokenizer, "model_proto"):
            blob = tokenizer.model_proto
        elif isinstance(tokenizer, sp_pb2.ModelProto):
            blob = tokenizer.SerializeToString()
        else:
            blob = bytes(tokenizer)
        proto = sp_pb2.ModelProto()
        proto.ParseFromString(blob)
        ns = proto.normalizer_spec
        if ns.add_dummy_prefix or ns.remove_extra_whitespaces or ns.precompiled_charsmap or not ns.escape_whitespaces:
            raise ValueError(
                "ByteVocab needs a sentencepiece model that keeps text as is: normalizer_spec with "
                "add_dummy_prefix=False, remove_extra_whitespaces=False, escape_whitespaces=True and no "
                "charsmap (train with normalization_rule_name='identity', add_dummy_prefix=False, "
                "remove_extra_whitespaces=False)"
            )
        if proto.trainer_spec.model_type != sp_pb2.TrainerSpec.BPE:
            raise ValueError("ByteVocab supports sentencepiece BPE models only (canonical encodings of unigram models are not prefix-closed)")
        self.sp = spm.SentencePieceProcessor(model_proto=blob)
        self.vocab_size = V = len(proto.pieces)
        self.eos_id = int(proto.trainer_spec.eos_id)
        self.bos_id = int(proto.trainer_spec.bos_id)

        kinds = np.full(V, SPECIAL, np.int8)
        tok_bytes: list[bytes] = []
        byte_token = np.full(256, -1, np.int64)
        for i, p in enumerate(proto.pieces):
            if p.type in (_Piece.NORMAL, _Piece.USER_DEFINED):
                kinds[i] = TEXT
                tok_bytes.append(p.piece.replace(SPACE_SYMBOL, " ").encode("utf-8"))
            elif p.type == _Piece.BYTE:
                kinds[i] = BYTE
                v = int(p.piece[3:5], 16)
                byte_token[v] = i
                tok_bytes.append(bytes([v]))
            else:
                tok_bytes.append(b"")
        self.kinds = kinds  # [V] TEXT / BYTE / SPECIAL
        self.token_bytes: tuple[bytes, ...] = tuple(tok_bytes)  # [V]
        self.lengths = np.array([len(b) for b in tok_bytes], np.int64)  # [V]
        self.max_len = int(self.lengths.max())
        self.byte_token = byte_token  # [256] id of <0xNN>, -1 if absent
        self.is_byte = kinds == BYTE

        stops = (self.eos_id,) if stop_ids is None else tuple(int(s) for s in stop_ids)
        for s in stops:
            if not 0 <= s < V or kinds[s] != SPECIAL:
                raise ValueError(f"stop id {s} is not a special (control) token of this vocabulary")
        self.stop_ids = stops

        text_ids = np.flatnonzero(kinds == TEXT)
        texts = [tok_bytes[i].decode("utf-8") for i in text_ids]
        # A text token is reachable only if the tokenizer writes it for its own bytes.
        enc = self.sp.encode(texts)
        canon = np.zeros(V, bool)
        canon[text_ids] = [e == [int(i)] for e, i in zip(enc, text_ids)]
        self.self_canonical = canon  # [V]

        # Sorted byte strings of the text tokens: "starts with b" is a range.
        order = sorted(range(len(text_ids)), key=lambda j: tok_bytes[text_ids[j]])
        self._sorted_ids = text_ids[order]  # [N]
        self._sorted_keys = [tok_bytes[i] for i in self._sorted_ids]
        self._rank = np.full(V, -1, np.int64)
        self._rank[self._sorted_ids] = np.arange(len(self._sorted_ids))
        self._by_bytes: dict[bytes, list[int]] = collections.defaultdict(list)
        for i in text_ids:
            self._by_bytes[tok_bytes[i]].append(int(i))

        # Characters and character pairs used by the pieces.
        singles = {t for t in texts if len(t) == 1}
        used = {c for t in texts for c in t}
        if not used <= singles:
            missing = sorted(used - singles)[:5]
            raise NotImplementedError(
                f"characters {missing!r} occur in pieces but are not pieces themselves; "
                "byte fallback could then join a neighbour, which ByteVocab does not model"
            )
        self._pairs = {t[k : k + 2] for t in texts for k in range(len(t) - 1)}
        # " " is written for "▁", so a literal "▁" in text has no encoding of its own.
        self._not_fallback = singles | {SPACE_SYMBOL}
        keys, counts = _utf8_fragment_table()
        own = collections.Counter()
        for c in self._not_fallback:
            b = c.encode("utf-8")
            for k in range(1, len(b)):
                own[_fragment_key(b[:k])] += 1
        have = counts - np.array([own.get(int(k), 0) for k in keys])
        self._fallback_fragments = {int(k) for k in keys[have > 0]}
        ud = [tok_bytes[i] for i, p in enumerate(proto.pieces) if p.type == _Piece.USER_DEFINED]
        self._ud_prefixes = {u[:k] for u in ud for k in range(1, len(u))}
        self._ud_max = max((len(u) for u in ud), default=0)

        self._byte_matrix_t: np.ndarray | None = None
        self._mask_cache: collections.OrderedDict[tuple[int, ...], np.ndarray] = collections.OrderedDict()
        self._cand_cache: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()
        self._cache_size = cache_size
        self.mask_stats = {"calls": 0, "misses": 0, "checked": 0}

    # ------------------------------------------------------------ byte views
    @property
    def byte_matrix_t(self) -> np.ndarray:
        """``[max_len, V]`` uint8: row k holds byte k of every token (0 past its end)."""
        if self._byte_matrix_t is None:
            m = np.zeros((self.max_len, self.vocab_size), np.uint8)
            for i, b in enumerate(self.token_bytes):
                if b:
                    m[: len(b), i] = np.frombuffer(b, np.uint8)
            self._byte_matrix_t = m
        return self._byte_matrix_t

    def decode(self, ids: Sequence[int]) -> bytes:
        """The bytes a token sequence writes (special tokens write nothing)."""
        return b"".join(self.token_bytes[int(i)] for i in ids)

    def tokens_with_prefix(self, prefix: bytes) -> np.ndarray:
        """Ids of the text and byte tokens whose bytes start with `prefix` (all of them for b"")."""
        keys = self._sorted_keys
        lo = bisect.bisect_left(keys, prefix)
        hi = bisect.bisect_left(keys, prefix + b"\xff") if prefix else len(keys)
        ids = self._sorted_ids[lo:hi]
        if len(prefix) <= 1:
            extra = self.byte_token[self.byte_token >= 0] if not prefix else self.byte_token[prefix[0] : prefix[0] + 1]
            ids = np.concatenate([ids, extra[extra >= 0]])
        return ids

    def tokens_prefix_of(self, data: bytes) -> list[int]:
        """Ids of the text tokens whose bytes are a non-empty prefix of `data`, shortest first."""
        out: list[int] = []
        for k in range(1, min(len(data), self.max_len) + 1):
            out.extend(self._by_bytes.get(data[:k], ()))
        return out

    def joinable(self, left: str, right: str) -> bool:
        """Whether some piece holds character `left` right before `right`.

        If not, no token can span the gap between them, so the canonical
        encoding of any text splits there: ``encode(a + b) == encode(a) + encode(b)``
        whenever `a` ends with `left` and `b` starts with `right`.
        """
        return (left + right) in self._pairs

    # ------------------------------------------------------------- validity
    def fallback_char(self, char: str) -> bool:
        """Whether the tokenizer writes `char` as byte-fallback tokens."""
        return len(char) == 1 and char not in self._not_fallback and not 0xD800 <= ord(char) <= 0xDFFF

    def fallback_fragment(self, frag: bytes) -> bool:
        """Whether an incomplete UTF-8 character can still complete to a byte-fallback character."""
        return 0 < len(frag) < 4 and _fragment_key(frag) in self._fallback_fragments

    def encode(self, data: bytes | str) -> list[int] | None:
        """Canonical encoding of a byte string (no BOS), or None when it has none.

        None for bytes that are not UTF-8 (apart from a trailing incomplete
        character that can still become a fallback character) and for text
        the tokenizer does not write back unchanged (a literal "▁").
        """
        if isinstance(data, str):
            data = data.encode("utf-8")
        parts = split_utf8(data)
        if parts is None:
            return None
        complete, frag = parts
        ids = list(self.sp.encode(complete.decode("utf-8"))) if complete else []
        if self.decode(ids) != complete:
            return None
        if frag:
            if not self.fallback_fragment(frag):
                return None
            ids += [int(self.byte_token[b]) for b in frag]
        return ids

    def is_valid(self, ids: Sequence[int]) -> bool:
        """Whether `ids` (no BOS) is a prefix of a canonical encoding; a stop
        token may come last, after a complete character."""
        ids = [int(i) for i in ids]
        stop = bool(ids) and ids[-1] in self.stop_ids
        if stop:
            ids = ids[:-1]
        if any(self.kinds[i] == SPECIAL for i in ids):
            return False
        data = self.decode(ids)
        if stop and trailing_fragment(data):
            return False
        return self.encode(data) == ids

    def _tail(self, ids: list[int]) -> list[int]:
        """The end of a valid context that decides which tokens may follow it.

        At least the last token; whole characters (byte-fallback runs); and
        every character that could start a user-defined piece spanning the
        junction, since those are matched whole before BPE.
        """
        n = len(ids)
        start = n - 1
        data = self.decode(ids[-max(1, self._ud_max) :]) if self._ud_max else b""
        need = max((k for k in range(1, len(data) + 1) if data[-k:] in self._ud_prefixes), default=0)
        have = len(self.token_bytes[ids[start]])
        while start > 0 and (have < need or (self.kinds[ids[start]] == BYTE and self.token_bytes[ids[start]][0] & 0xC0 == 0x80)):
            start -= 1
            have += len(self.token_bytes[ids[start]])
        return ids[start:]

    def _crossing_candidates(self, tail_bytes: bytes) -> np.ndarray:
        """Text tokens `t` such that some piece is ``u + v`` with `u` a non-empty
        suffix of `tail_bytes` and `v` a non-empty prefix of `t`: [V] bool."""
        keys = self._sorted_keys
        hit = np.zeros(len(keys), bool)
        for k in range(1, min(len(tail_bytes), self.max_len - 1) + 1):
            u = tail_bytes[-k:]
            if u[0] & 0xC0 == 0x80:  # not a character boundary
                continue
            cached = self._cand_cache.get(u)
            if cached is not None:
                self._cand_cache.move_to_end(u)
                cached = np.unpackbits(cached, count=len(keys)).astype(bool)
            else:
                diff = np.zeros(len(keys) + 1, np.int64)
                lo = bisect.bisect_left(keys, u)
                hi = bisect.bisect_left(keys, u + b"\xff")
                for p in keys[lo:hi]:
                    v = p[k:]
                    if not v:
                        continue
                    a = bisect.bisect_left(keys, v)
                    b = bisect.bisect_left(keys, v + b"\xff")
                    diff[a] += 1
                    diff[b] -= 1
                cached = np.cumsum(diff[:-1]) > 0  # [N] over sorted positions
                self._cand_cache[u] = np.packbits(cached)
                if len(self._cand_cache) > self._cache_size:
                    self._cand_cache.popitem(last=False)
            hit |= cached
        mask = np.zeros(self.vocab_size, bool)
        mask[self._sorted_ids[hit]] = True
        return mask

    def valid_next(self, ids: Sequence[int]) -> np.ndarray:
        """``[V]`` bool: tokens `t` such that ``ids + [t]`` is valid (`ids` must be valid).

        `ids` may start with special tokens (BOS); only the text after the last
        special token matters. Stop tokens are valid after a complete character.
        """
        ids = [int(i) for i in ids]
        last_special = max((k for k, i in enumerate(ids) if self.kinds[i] == SPECIAL), default=-1)
        ids = ids[last_special + 1 :]
        self.mask_stats["calls"] += 1
        if not ids:
            return self._base_mask()
        frag = trailing_fragment(self.decode(ids[-3:]))
        if frag:  # a valid context ends inside a character only on byte-fallback tokens
            return self._continue_fragment(frag)
        tail = tuple(self._tail(ids))
        hit = self._mask_cache.get(tail)
        if hit is not None:
            self._mask_cache.move_to_end(tail)
            return np.unpackbits(hit, count=self.vocab_size).astype(bool)
        self.mask_stats["misses"] += 1
        mask = self._base_mask()
        tail_bytes = self.decode(tail)
        cand = self._crossing_candidates(tail_bytes) & mask
        cid = np.flatnonzero(cand)
        if cid.size:
            self.mask_stats["checked"] += int(cid.size)
            prefix = tail_bytes.decode("utf-8")
            enc = self.sp.encode([prefix + self.token_bytes[i].decode("utf-8") for i in cid])
            want = list(tail)
            mask[cid] = [e[:-1] == want and e[-1] == i for e, i in zip(enc, cid.tolist())]
        self._mask_cache[tail] = np.packbits(mask)
        if len(self._mask_cache) > self._cache_size:
            self._mask_cache.popitem(last=False)
        return mask

    def _base_mask(self) -> np.ndarray:
        """Valid next tokens after a complete character, before crossing checks."""
        mask = self.self_canonical.copy()
        for b in range(256):
            t = self.byte_token[b]
            if t >= 0:
                mask[t] = self.fallback_char(chr(b)) if b < 0x80 else self.fallback_fragment(bytes([b]))
        mask[list(self.stop_ids)] = True
        return mask

    def _continue_fragment(self, frag: bytes) -> np.ndarray:
        """After an incomplete fallback character only the byte tokens that keep it possible are valid."""
        mask = np.zeros(self.vocab_size, bool)
        for b in range(0x80, 0xC0):
            t = self.byte_token[b]
            if t < 0:
                continue
            nxt = frag + bytes([b])
            parts = split_utf8(nxt)
            if parts is None:
                continue
            complete, rest = parts
            mask[t] = self.fallback_fragment(rest) if rest else self.fallback_char(complete.decode("utf-8"))
        return mask
