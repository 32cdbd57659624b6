"""Validity masks: which next tokens keep a token sequence canonical.

Phan et al., "Exact Byte-Level Probabilities from Tokenized Language Models
for FIM-Tasks and Model Ensembles" (2024) sum a tokenized model's probability
over *valid* token sequences only: prefixes of the tokenizer's canonical
encoding of some text (see `tokax.decode.byte_level.next_byte`). This module
computes, for a context `s`, the ``[V]`` mask of the tokens `t` after which
``s + [t]`` is still valid.

`ByteVocab.valid_next` decides it by re-encoding ``bytes(tail) + bytes(t)``
with sentencepiece for every token some piece could join to the tail: the
costly part on a 262k vocabulary. `BPEJunctions.valid_next` gives the same
mask but re-encodes only the tokens that a BPE merge could join to the
context's last token (the argument is in its docstring), cached per context
tail; `bpe_junctions(vocab)` builds it once per vocabulary.
"""

from __future__ import annotations

import bisect
import collections
import heapq
import math
import weakref
from collections.abc import Sequence

import numpy as np

from tokax.tokenize.byte_vocab import SPACE_SYMBOL as SPACE
from tokax.tokenize.byte_vocab import SPECIAL, ByteVocab, trailing_fragment
from tokax.tokenize.byte_vocab import TEXT as TEXT_KIND

__all__ = ["BPEJunctions", "bpe_junctions"]


class BPEJunctions:
    """Which tokens may merge with the end of a context under sentencepiece BPE:
    `valid_next` from fewer re-encodings.

    `ByteVocab.valid_next(s)` re-encodes ``bytes(tail) + bytes(t)`` for every
    token `t` that some piece could join to the tail; on a 262k vocabulary that
    is ~60k strings per new context (the profile's hot spot). This narrows the
    candidates with the BPE merge order, then re-encodes only those, so the
    mask is the same set, decided by sentencepiece.

    Why the narrowing is sound. sentencepiece BPE repeatedly merges the adjacent
    pair of symbols whose concatenation is a piece of highest score (ties: the
    leftmost). If ``encode(bytes(s) + bytes(t)) != s + [t]`` some merge joins a
    symbol `a` ending at the junction with a symbol `b` starting there (or a
    user-defined piece is matched across it, handled as in ByteVocab). Until the
    first such merge each side evolves exactly as when encoded alone, so `a` is
    one of the successive right-most symbols of the last token `L` of `s`
    encoded alone, and `b` one of the left-most symbols of `t` encoded alone.
    The pair ``(a, b)``, with score tau = score(a + b), is merged only if it is
    at the top of the queue, i.e. tau >= the score of the next merge on either
    side at that moment: tau >= thr(b) = min over the merges made while `b`
    exists (on t's side), and likewise tau >= thr(a) on L's side (a final
    symbol has thr = -inf). Candidates are therefore

        { t : exists (a, thr_a) in chain_right(L), piece p = a + b with
              score(p) >= thr_a, (b, thr_b) in chain_left(t), score(p) >= thr_b },

    plus the user-defined-piece crossings; each candidate is then decided by
    sentencepiece itself, as in ByteVocab. Contexts whose last token is a
    byte-fallback token fall back to ByteVocab.valid_next.

    The argument models sentencepiece's `bpe_model.cc` (pair queue, stale-entry
    skip, frozen user-defined symbols); tests compare the mask with
    ByteVocab's on toy, stdlib-BPE and Gemma contexts. The candidates are
    not always exactly the invalid set (runs of spaces are over-counted), so
    the re-encoding stays. Cost: about 3x fewer re-encodings than ByteVocab
    after a whole word; after a partial word (e.g. "▁sel") most candidates
    are really invalid (6k-60k on Gemma) and the saving is small.
    """

    def __init__(self, vocab: ByteVocab) -> None:
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2

        proto = sp_pb2.ModelProto()
        proto.ParseFromString(vocab.sp.serialized_model_proto())
        P = sp_pb2.ModelProto.SentencePiece
        self.vocab = vocab
        # sentencepiece's merge table: NORMAL, USER_DEFINED and UNUSED pieces by text.
        self.score: dict[str, float] = {}
        self.ud: set[str] = set()
        for p in proto.pieces:
            if p.type in (P.NORMAL, P.USER_DEFINED, P.UNUSED):
                self.score.setdefault(p.piece, float(p.score))
            if p.type == P.USER_DEFINED:
                self.ud.add(p.piece)
        self._ud_max = max((len(u) for u in self.ud), default=0)
        self._ud_first = {u[0] for u in self.ud}
        self.pieces = [p.piece for p in proto.pieces]
        V = vocab.vocab_size
        # Right index: for every text token t, its successive left-most symbols b with thr(b).
        by_b: dict[str, list[tuple[float, int]]] = collections.defaultdict(list)
        self._right_chain: list[list[tuple[str, float]]] = [[] for _ in range(V)]
        for t in np.flatnonzero(vocab.kinds == TEXT_KIND):
            t = int(t)
            left, right = self._chains(self.pieces[t])
            self._right_chain[t] = right
            for b, thr in left:
                by_b[b].append((thr, t))
        self._index: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for b, rows in by_b.items():
            rows.sort()
            self._index[b] = (np.array([r[0] for r in rows]), np.array([r[1] for r in rows], np.int64))
        self._sorted_pieces = sorted(self.score)
        self._by_prefix: dict[str, list[tuple[float, str]]] = {}
        self._cand_by_last: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._ud_bytes = [u.replace(SPACE, " ").encode("utf-8") for u in self.ud]
        self._masks: collections.OrderedDict[tuple[int, ...], np.ndarray] = collections.OrderedDict()
        self.stats = {"calls": 0, "misses": 0, "checked": 0, "fallback": 0}

    # -- sentencepiece BPE on one piece, recording the junction symbols
    def _split(self, text: str) -> list[tuple[str, bool]]:
        """sentencepiece's initial symbols: the longest user-defined piece (frozen) or one character."""
        out, i = [], 0
        while i < len(text):
            k = 0
            if text[i] in self._ud_first:
                k = max((n for n in range(1, min(self._ud_max, len(text) - i) + 1) if text[i : i + n] in self.ud), default=0)
            if k:
                out.append((text[i : i + k], True))
                i += k
            else:
                out.append((text[i], False))
                i += 1
        return out

    def _chains(self, text: str) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
        """Encode `text` alone with BPE; the left-most and right-most symbols over time,
        each with thr = the lowest score merged while it existed (-inf for the final ones)."""
        sym = self._split(text)
        pieces = [s for s, _ in sym]
        frozen = [f for _, f in sym]
        n = len(pieces)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n)) + [-1]
        heap: list[tuple[float, int, int, int]] = []

        def push(l: int, r: int) -> None:
            if l < 0 or r < 0 or frozen[l] or frozen[r]:
                return
            s = self.score.get(pieces[l] + pieces[r])
            if s is not None:
                heapq.heappush(heap, (-s, l, r, len(pieces[l]) + len(pieces[r])))

        for i in range(n - 1):
            push(i, i + 1)
        last = n - 1
        left_chain, right_chain = [], []
        lthr = rthr = math.inf
        while heap:
            negs, l, r, size = heapq.heappop(heap)
            if not pieces[l] or not pieces[r] or len(pieces[l]) + len(pieces[r]) != size:
                continue  # stale entry, as sentencepiece skips it
            s = -negs
            lthr, rthr = min(lthr, s), min(rthr, s)
            if l == 0:
                left_chain.append((pieces[0], lthr))
                lthr = math.inf
            if r == last:
                right_chain.append((pieces[last], rthr))
                rthr = math.inf
                last = l
            pieces[l] += pieces[r]
            pieces[r] = ""
            nxt[l] = nxt[r]
            if nxt[r] >= 0:
                prev[nxt[r]] = l
            push(prev[l], l)
            push(l, nxt[l])
        # Final symbols; a user-defined one is frozen and never merges.
        if n and not frozen[0]:
            left_chain.append((pieces[0], -math.inf))
        if n and not frozen[last]:
            right_chain.append((pieces[last], -math.inf))
        return left_chain, right_chain

    def _pieces_after(self, a: str) -> list[tuple[float, str]]:
        """(score, b) for every piece a + b, highest score first."""
        got = self._by_prefix.get(a)
        if got is None:
            keys = self._sorted_pieces
            lo = bisect.bisect_left(keys, a)
            hi = bisect.bisect_left(keys, a + "\U0010ffff")
            got = sorted(((self.score[p], p[len(a):]) for p in keys[lo:hi] if len(p) > len(a)), reverse=True)
            self._by_prefix[a] = got
        return got

    def bpe_candidates(self, last: int) -> np.ndarray:
        """``[V]`` bool: tokens some BPE merge could join to a context ending with token `last`."""
        hit = self._cand_by_last.get(last)
        if hit is not None:
            self._cand_by_last.move_to_end(last)
            return hit
        mask = np.zeros(self.vocab.vocab_size, bool)
        if self.vocab.kinds[last] == TEXT_KIND:
            for a, thr_a in self._right_chain[last]:
                for tau, b in self._pieces_after(a):
                    if tau < thr_a:
                        break
                    idx = self._index.get(b)
                    if idx is not None:
                        k = int(np.searchsorted(idx[0], tau, side="right"))
                        mask[idx[1][:k]] = True
        self._cand_by_last[last] = mask
        if len(self._cand_by_last) > 4096:
            self._cand_by_last.popitem(last=False)
        return mask

    def ud_candidates(self, tail_bytes: bytes) -> np.ndarray:
        """``[V]`` bool: tokens t such that a user-defined piece u + v has u a suffix of the tail, v a prefix of t."""
        v = self.vocab
        mask = np.zeros(v.vocab_size, bool)
        for u in self._ud_bytes:
            for k in range(1, len(u)):
                if tail_bytes.endswith(u[:k]):
                    mask[v.tokens_with_prefix(u[k:])] = True
        return mask

    def valid_next(self, ids: Sequence[int]) -> np.ndarray:
        """``[V]`` bool, the same mask as ``ByteVocab.valid_next(ids)``."""
        v = self.vocab
        ids = [int(i) for i in ids]
        last_special = max((k for k, i in enumerate(ids) if v.kinds[i] == SPECIAL), default=-1)
        ids = ids[last_special + 1 :]
        self.stats["calls"] += 1
        if not ids or v.kinds[ids[-1]] != TEXT_KIND or trailing_fragment(v.decode(ids[-3:])):
            self.stats["fallback"] += 1
            return v.valid_next(ids)
        tail = tuple(v._tail(ids))
        hit = self._masks.get(tail)
        if hit is not None:
            self._masks.move_to_end(tail)
            return np.unpackbits(hit, count=v.vocab_size).astype(bool)
        self.stats["misses"] += 1
        mask = v._base_mask()
        tail_bytes = v.decode(tail)
        cand = (self.bpe_candidates(ids[-1]) | self.ud_candidates(tail_bytes)) & mask
        cid = np.flatnonzero(cand)
        if cid.size:
            self.stats["checked"] += int(cid.size)
            prefix = tail_bytes.decode("utf-8")
            enc = v.sp.encode([prefix + v.token_bytes[i].decode("utf-8") for i in cid])
            want = list(tail)
            mask[cid] = [e[:-1] == want and e[-1] == i for e, i in zip(enc, cid.tolist())]
        self._masks[tail] = np.packbits(mask)
        if len(self._masks) > 1024:
            self._masks.popitem(last=False)
        return mask


_JUNCTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def bpe_junctions(vocab: ByteVocab) -> BPEJunctions:
    """The (cached) `BPEJunctions` of a vocabulary: built once (~15 s of CPU for 262k pieces)."""
    j = _JUNCTIONS.get(vocab)
    if j is None:
        j = _JUNCTIONS[vocab] = BPEJunctions(vocab)
    return j
