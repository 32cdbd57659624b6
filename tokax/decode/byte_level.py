"""Exact next-byte distributions of a tokenized language model, and a byte-level sampler.

Phan et al., "Exact Byte-Level Probabilities from Tokenized Language Models
for FIM-Tasks and Model Ensembles" (2024). A tokenized model writes bytes by
sampling tokens; the probability that its text starts with the bytes `x` is
a sum over token sequences (Byte-Token Representation Lemma):

    P(x) = sum over c in cover(x) of Q(c),
    cover(x) = { valid c = t_1..t_k : bytes(t_1..t_{k-1}) is a proper prefix of x,
                                       x is a prefix of bytes(t_1..t_k) },

and the next-byte distribution is P(x b) / P(x) for each byte b, plus
P(x, end) = Q(encode(x) + [EOS]) for the end of the text (index `STOP` = 256).
Conditioning on a prompt, "the text" is what follows the prompt's canonical
tokens up to a root position (see below), so P(x) above is relative to it.

What is summed, precisely.
* `Q(c)` is a probability of the token sequence `c` (from the model's next
  token distributions p(t | prefix)) and `c` ranges over *valid* sequences
  only: prefixes of the tokenizer's canonical encoding of some text
  (`ByteVocab.valid_next`). A valid sequence whose bytes equal `x` is
  `encode(x)` itself; every other cover is a canonical prefix of a longer
  text whose last token crosses the end of `x` (e.g. for x = "▁th": [▁th],
  [▁the], [▁this], ..., and [▁, thx] only if that pair is canonical).
* The lemma assumes the model puts no mass on invalid (non-canonical)
  sequences; a trained model puts a little. `renormalize=True` (default)
  removes it at every step, Q(t | s) = p(t | s) [s t valid] / Z(s), which
  makes Q a proper distribution over canonical sequences ("local
  canonicalization"): the next-byte probabilities then sum to one by
  themselves, and the byte-level probability of a whole text (its bytes,
  then the end) equals Q(encode(text) + [EOS]). `renormalize=False` is the
  paper's implementation: Q(t | s) = p(t | s) [s t valid], unnormalized,
  with each next-byte distribution normalized over its 257 outcomes.
* Non-canonical sequences (e.g. [▁t, he] when "▁the" is a token) are never
  counted. Special tokens other than the stop ids are invalid (never written).

The algorithm (one model call per new byte). The covers of x are grouped by
the byte position i where their last token starts ("splits"): the prefix is
then the canonical encoding s_i of x[:i], with weight W_i = Q(s_i), and the
last token is any valid t after s_i that starts with x[i:]. Appending a byte
b keeps the tokens whose next byte is b; one of them may end exactly at the
new end: that is the canonical encoding of x b, a new node of the token trie,
which one model call evaluates, and whose every valid next token starts a new
split. Splits die when no token still matches (at most the longest token's
length back). The model's states live in a token trie over a KV cache that
holds the common prefix (the root); a call runs the path from the root to
the new node with a tree mask, and the root moves down to the deepest node
that every live split shares.

Starting from a prompt that ends inside a token: the live splits of the
prompt are found directly (positions i with some token starting with
x[i:]); the root is put at a position where no piece can span two adjacent
characters (`ByteVocab.joinable`), at or before the first live split, so the
canonical encodings of all later prefixes share the root's tokens.

The validity mask (which next tokens keep a sequence canonical) is the
costly part on a 262k vocabulary: `BPEJunctions` computes the same mask as
`ByteVocab.valid_next` but re-encodes only the tokens that a BPE merge could
join to the context's last token (see its docstring), cached per context tail.

Ensembles: anything with `reset(prompt)`, `next_byte_probs()` and
`advance(byte)` can be sampled or scored; `ByteMixture` mixes models with
different vocabularies byte by byte, with fixed weights or with the
Bayesian posterior weights. `byte_logprobs` / `bits_per_byte` score a text
exactly: the per-byte log-probabilities telescope to log P(x), the cover sum.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import heapq
import math
import weakref
from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from tokax.errors import ContextTooLong
from tokax.model import kv_cache as kvc
from tokax.model.config import ModelConfig
from tokax.model.decoder import Params, forward, unembed
from tokax.tokenize.byte_vocab import SPACE_SYMBOL as SPACE
from tokax.tokenize.byte_vocab import SPECIAL, STOP, ByteVocab, split_utf8, trailing_fragment
from tokax.tokenize.byte_vocab import TEXT as TEXT_KIND

__all__ = ["STOP", "BPEJunctions", "ByteLM", "ByteMixture", "ByteSample", "NextByteModel", "TokenTrie", "bits_per_byte", "byte_logprobs", "sample_bytes"]

_NEG_INF = -math.inf


def _bucket(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _logsumexp(a: np.ndarray) -> float:
    if a.size == 0:
        return _NEG_INF
    m = float(np.max(a))
    if m == _NEG_INF:
        return _NEG_INF
    return m + math.log(float(np.sum(np.exp(a - m))))


@functools.partial(jax.jit, static_argnums=(0,))
def _tree_logits(cfg: ModelConfig, params: Params, tokens, positions, block_mask, cache, rows):
    """Logits ``[K, V]`` at rows ``rows [K]`` of a token tree ``[1, T]`` written after the cache."""
    _, hidden, _ = forward(cfg, params, tokens, positions, cache, block_mask, return_logits=False)
    return unembed(cfg, params, hidden[0, rows])


@functools.partial(jax.jit, static_argnums=(0,))
def _prefill(cfg: ModelConfig, params: Params, tokens, positions, cache, n_real):
    """Append ``tokens [1, T]`` (the first ``n_real`` real, the rest padding)
    to the cache; logits ``[V]`` after the last real token and the cache."""
    start = cache.length
    _, hidden, cache = forward(cfg, params, tokens, positions, cache, return_logits=False)
    last = jax.lax.dynamic_index_in_dim(hidden[0], n_real - 1, keepdims=True)  # [1, D]
    cache = kvc.rollback(cache, start + n_real)  # drop the padding slots
    return unembed(cfg, params, last)[0], cache


# ---------------------------------------------------------------- validity
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


_MASKS = ("vocab", "junction")


@dataclasses.dataclass(eq=False)
class _Node:
    """A token sequence: the root prefix, then the path of tokens down to this node."""

    token: int
    pos: int  # position of `token` in the model's sequence
    parent: _Node | None
    children: dict[int, _Node] = dataclasses.field(default_factory=dict)
    logp: np.ndarray | None = None  # [V] float64 model log p(next | this node)
    logq: np.ndarray | None = None  # [V] float64 log Q(next | this node), -inf where invalid
    stop_logq: float = _NEG_INF  # log Q(stop | this node)
    logw: float | None = None  # log Q(path from the root to this node)

    def path_from(self, root: _Node) -> list[_Node]:
        """Nodes strictly below `root` down to this one, root side first."""
        out = []
        n: _Node | None = self
        while n is not root:
            if n is None:
                raise ValueError("node is not below the root")
            out.append(n)
            n = n.parent
        return out[::-1]


class TokenTrie:
    """Model states for a trie of token sequences sharing one prefix.

    The prefix (BOS, prompt tokens up to the root) lives in a KV cache; the
    tokens below the root are recomputed in one tree-masked call whenever a
    new node needs logits (they are few: the root follows the live splits).
    """

    def __init__(
        self, cfg: ModelConfig, params: Params, vocab: ByteVocab, renormalize: bool = True, reserve: int = 512, mask: str = "vocab"
    ) -> None:
        if cfg.vocab_size < vocab.vocab_size:
            raise ValueError(f"model vocab_size={cfg.vocab_size} is smaller than the tokenizer's {vocab.vocab_size}")
        if mask not in _MASKS:
            raise ValueError(f"mask={mask!r}: use one of {', '.join(_MASKS)}")
        self.cfg, self.params, self.vocab = cfg, params, vocab
        # The validity mask: ByteVocab's own, or the same mask from BPE-junction candidates
        # (fewer re-encodings for contexts that end a word; about as many after a partial word).
        self.valid_next = vocab.valid_next if mask == "vocab" else bpe_junctions(vocab).valid_next
        self.renormalize = renormalize
        self.reserve = reserve
        self.calls = 0  # model calls (prefill and tree)
        self.tokens_run = 0  # tokens through the model, padding excluded
        self.root: _Node | None = None
        self.prefix: list[int] = []
        self.cache = None

    # --------------------------------------------------------------- prefix
    def reset(self, prefix: Sequence[int]) -> _Node:
        """Start over with `prefix` (BOS first) in the cache; returns the root node."""
        prefix = [int(t) for t in prefix]
        if not prefix:
            raise ValueError("the token prefix is empty; start it with BOS")
        self.prefix = []
        cap = _bucket(len(prefix) + self.reserve, 64)
        self.cache = kvc.init_cache(self.cfg, 1, min(cap, self.cfg.max_seq_len))
        logits = self._append(prefix)
        self.root = _Node(token=prefix[-1], pos=len(prefix) - 1, parent=None, logw=0.0)
        self._set_logits(self.root, logits)
        return self.root

    def _ensure_capacity(self, extra: int) -> None:
        """Grow the cache (re-running the prefix) when `extra` more slots would not fit."""
        if len(self.prefix) + extra <= self.cache.max_len:
            return
        need = _bucket(len(self.prefix) + extra + self.reserve, 64)
        if len(self.prefix) + extra > self.cfg.max_seq_len:
            raise ContextTooLong(
                f"byte-level context of {len(self.prefix) + extra} tokens exceeds the model's "
                f"max_seq_len={self.cfg.max_seq_len}; shorten the prompt or max_new_bytes"
            )
        old = self.prefix
        self.prefix = []
        self.cache = kvc.init_cache(self.cfg, 1, min(need, self.cfg.max_seq_len))
        self._append(old)

    def _append(self, tokens: list[int]) -> np.ndarray:
        """Write `tokens` into the cache after the prefix; logits after the last one."""
        n = len(tokens)
        T = _bucket(n, 8)
        self._ensure_capacity(T)
        toks = np.zeros((1, T), np.int32)
        toks[0, :n] = tokens
        pos = np.full((1, T), -1, np.int32)
        pos[0, :n] = np.arange(len(self.prefix), len(self.prefix) + n)
        logits, self.cache = _prefill(self.cfg, self.params, jnp.asarray(toks), jnp.asarray(pos), self.cache, jnp.int32(n))
        self.prefix += tokens
        self.calls += 1
        self.tokens_run += n
        return np.asarray(logits)

    def advance_root(self, node: _Node) -> None:
        """Move the root down to `node` (a descendant): its path joins the cached prefix."""
        path = node.path_from(self.root)
        if not path:
            return
        self._append([n.token for n in path])
        node.parent = None
        self.root = node

    # ----------------------------------------------------------------- trie
    def child(self, node: _Node, token: int) -> _Node:
        c = node.children.get(token)
        if c is None:
            c = _Node(token=int(token), pos=node.pos + 1, parent=node)
            node.children[int(token)] = c
        return c

    def context(self, node: _Node, n_last: int = 48) -> list[int]:
        """The last `n_last` tokens of the sequence ending at `node` (BOS included when reached)."""
        path = [n.token for n in node.path_from(self.root)]
        need = max(0, n_last - len(path))
        return (self.prefix[-need:] if need else []) + path[-n_last:]

    def evaluate(self, nodes: Sequence[_Node]) -> None:
        """Compute logits at `nodes` (and nothing else) in one tree-masked model call."""
        targets = [n for n in nodes if n.logp is None]
        if not targets:
            return
        tree: dict[int, _Node] = {}
        for n in targets:
            for m in n.path_from(self.root):
                tree[id(m)] = m
        order = sorted(tree.values(), key=lambda m: m.pos)  # parents before children
        index = {id(m): k for k, m in enumerate(order)}
        T = _bucket(len(order), 8)
        toks = np.zeros((1, T), np.int32)
        pos = np.full((1, T), -1, np.int32)
        mask = np.zeros((1, T, T), bool)
        for k, m in enumerate(order):
            toks[0, k] = m.token
            pos[0, k] = m.pos
            a: _Node | None = m
            while a is not None and a is not self.root:
                mask[0, k, index[id(a)]] = True
                a = a.parent
        for k in range(len(order), T):
            mask[0, k, k] = True
        K = _bucket(len(targets), 1)
        rows = np.array([index[id(n)] for n in targets] + [index[id(targets[0])]] * (K - len(targets)), np.int32)
        self._ensure_capacity(T)
        logits = np.asarray(
            _tree_logits(self.cfg, self.params, jnp.asarray(toks), jnp.asarray(pos), jnp.asarray(mask), self.cache, jnp.asarray(rows))
        )
        self.calls += 1
        self.tokens_run += len(order)
        for n, lg in zip(targets, logits):
            self._set_logits(n, lg)

    def _set_logits(self, node: _Node, logits: np.ndarray) -> None:
        lg = np.asarray(logits, np.float64)[: self.vocab.vocab_size]
        node.logp = lg - _logsumexp(lg)

    def logq(self, node: _Node) -> np.ndarray:
        """log Q(next token | node) over the vocabulary, -inf for tokens that break validity."""
        if node.logq is None:
            self.evaluate([node])
            valid = self.valid_next(self.context(node))
            lq = np.where(valid, node.logp, _NEG_INF)
            if self.renormalize:
                lq = lq - _logsumexp(lq[valid])
            node.logq = lq
            node.stop_logq = _logsumexp(lq[list(self.vocab.stop_ids)])
        return node.logq

    def logw(self, node: _Node) -> float:
        """log Q of the path from the root to `node` (the root's own weight is the reference).

        Path edges are valid by construction, so without renormalization the
        model's own log p is used and no mask is needed along the path.
        """
        if node.logw is None:
            parent = node.parent
            if self.renormalize:
                step = self.logq(parent)[node.token]
            else:
                self.evaluate([parent])
                step = parent.logp[node.token]
            node.logw = self.logw(parent) + float(step)
        return node.logw

    def release(self, node: _Node) -> None:
        """Drop a node's distributions (its weight stays)."""
        node.logp = None
        node.logq = None


@dataclasses.dataclass
class _Split:
    """Covers whose last token starts at byte `start`: prefix `node`, last tokens `cand`."""

    start: int
    node: _Node
    cand: np.ndarray  # [M] token ids: valid after node, bytes start with x[start:n], longer than n - start
    logw: np.ndarray  # [M] float64 log Q(node) + log Q(t | node)


class NextByteModel(Protocol):
    def reset(self, prompt: bytes | str) -> None: ...

    def next_byte_probs(self) -> np.ndarray: ...

    def advance(self, byte: int) -> None: ...


class ByteLM:
    """A tokenized model seen as a model over bytes (exact next-byte distributions).

    ``reset(prompt)`` conditions on the prompt's bytes (which may end inside a
    token, or inside a character); ``next_byte_probs()`` gives the
    distribution ``[257]`` over the next byte, index `STOP` being the end of
    the text; ``advance(byte)`` appends a byte. Costs: one model call when
    the new bytes end a canonical token sequence (nearly every byte), plus a
    validity mask per new context tail (cached).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        params: Params,
        vocab: ByteVocab,
        *,
        renormalize: bool = True,
        reserve: int = 512,
        root_lag: int = 4,
        mask: str = "vocab",
    ) -> None:
        if vocab.bos_id < 0:
            raise ValueError("ByteLM needs a vocabulary with a BOS token to condition the first byte on")
        self.vocab = vocab
        self.trie = TokenTrie(cfg, params, vocab, renormalize=renormalize, reserve=reserve, mask=mask)
        self.root_lag = root_lag  # move the root once the shared path is this many tokens long
        self._splits: list[_Split] = []
        self._exact: _Node | None = None
        self._data = b""
        # Next-byte mass over the cover mass P(x): 1 when renormalizing (a
        # consistency check), below 1 without (the mass of invalid next tokens).
        self.mass_ratio = 1.0

    @property
    def text(self) -> bytes:
        """The bytes conditioned on so far (prompt and appended bytes)."""
        return self._data

    @property
    def calls(self) -> int:
        return self.trie.calls

    # ---------------------------------------------------------------- reset
    def reset(self, prompt: bytes | str) -> None:
        data = prompt.encode("utf-8") if isinstance(prompt, str) else bytes(prompt)
        v = self.vocab
        if split_utf8(data) is None:
            raise ValueError("prompt bytes are not UTF-8 (apart from an incomplete last character)")
        n = len(data)
        live = [i for i in range(max(0, n - v.max_len), n) if v.tokens_with_prefix(data[i:]).size] + [n]
        j0 = self._root_position(data, min(live))
        head = v.encode(data[:j0])
        if head is None:
            raise ValueError(f"prompt text {data[:j0][-40:]!r} has no canonical encoding (a literal '\\u2581'?)")
        trie = self.trie
        root = trie.reset([v.bos_id] + head)
        nodes: dict[int, _Node] = {}
        for i in live:
            if i < j0:
                continue
            ids = v.encode(data[j0:i])
            if ids is None:  # x[:i] ends inside a character that cannot be a fallback one
                continue
            node = root
            for t in ids:
                node = trie.child(node, t)
            nodes[i] = node
        # Weights need logits along every path; one tree call covers them all.
        everything = {id(m): m for node in nodes.values() for m in [root] + node.path_from(root)}
        trie.evaluate(list(everything.values()))
        splits = []
        for i, node in sorted(nodes.items()):
            lq = trie.logq(node)
            w = trie.logw(node)
            if i < n:
                cand = v.tokens_with_prefix(data[i:])
                cand = cand[(v.lengths[cand] > n - i) & np.isfinite(lq[cand])]
                if cand.size:
                    splits.append(_Split(i, node, cand, w + lq[cand]))
        self._data = data
        self._splits = splits
        self._exact = None
        if n in nodes:
            self._open(nodes[n])
        for m in everything.values():
            trie.release(m)
        self._normalize()

    def _root_position(self, data: bytes, limit: int) -> int:
        """Largest byte offset <= limit between two complete characters that no piece joins (0 if none)."""
        complete, _ = split_utf8(data)
        text = complete.decode("utf-8")
        offsets = np.cumsum([0] + [len(c.encode("utf-8")) for c in text])  # byte offset of each char
        for k in range(len(text) - 1, 0, -1):
            if offsets[k] <= limit and not self.vocab.joinable(text[k - 1], text[k]):
                return int(offsets[k])
        return 0

    def _open(self, node: _Node) -> None:
        """`node` is the canonical encoding of the text so far: its next tokens start a split."""
        lq = self.trie.logq(node)
        w = self.trie.logw(node)
        cand = np.flatnonzero(np.isfinite(lq) & (self.vocab.lengths > 0))
        self._splits.append(_Split(len(self._data), node, cand, w + lq[cand]))
        self._exact = node

    def _normalize(self) -> None:
        """Rescale the weights so that the next-byte masses sum to one."""
        n = len(self._data)
        parts = [s.logw for s in self._splits]
        covers = [s.logw for s in self._splits if s.start < n]
        if self._exact is not None:
            parts.append(np.array([self._exact.logw + self._exact.stop_logq]))
            covers.append(np.array([self._exact.logw]))
        total = _logsumexp(np.concatenate(parts)) if parts else _NEG_INF
        if total == _NEG_INF:
            raise ValueError(f"the model gives the text {self._data[-40:]!r} probability zero")
        self.mass_ratio = math.exp(total - _logsumexp(np.concatenate(covers)))
        for s in self._splits:
            s.logw = s.logw - total
        if self._exact is not None:
            self._exact.logw -= total

    # ----------------------------------------------------------------- step
    def next_byte_probs(self) -> np.ndarray:
        """``[257]`` float64: P(next byte | text so far); index 256 (`STOP`) ends the text."""
        out = np.zeros(257, np.float64)
        bm = self.vocab.byte_matrix_t
        n = len(self._data)
        for s in self._splits:
            out[:256] += np.bincount(bm[n - s.start][s.cand], weights=np.exp(s.logw), minlength=256)
        if self._exact is not None:
            out[STOP] = math.exp(self._exact.logw + self._exact.stop_logq)
        return out / out.sum()

    def advance(self, byte: int) -> None:
        """Append one byte to the text."""
        byte = int(byte)
        if not 0 <= byte < 256:
            raise ValueError(f"byte {byte} is not in [0, 256)")
        v, trie = self.vocab, self.trie
        bm = v.byte_matrix_t
        n = len(self._data)
        splits: list[_Split] = []
        exact: tuple[_Node, int, float] | None = None
        for s in self._splits:
            off = n - s.start
            keep = bm[off][s.cand] == byte
            cand, lw = s.cand[keep], s.logw[keep]
            ends = v.lengths[cand] == off + 1
            if ends.any():
                if exact is not None or ends.sum() > 1:
                    raise RuntimeError("two valid token sequences write the same bytes; the validity mask is wrong")
                k = int(np.flatnonzero(ends)[0])
                exact = (s.node, int(cand[k]), float(lw[k]))
                cand, lw = cand[~ends], lw[~ends]
            if cand.size:
                splits.append(_Split(s.start, s.node, cand, lw))
        if self._exact is not None:
            trie.release(self._exact)
        self._data += bytes([byte])
        self._splits = splits
        self._exact = None
        if exact is not None:
            parent, token, w = exact
            node = trie.child(parent, token)
            node.logw = w
            trie.evaluate([node])
            self._open(node)
            trie.release(node)
        if not self._splits and self._exact is None:
            raise ValueError(f"byte {byte:#04x} has probability zero after {self._data[:-1][-40:]!r}")
        self._normalize()
        self._move_root()

    def _move_root(self) -> None:
        """Fold the path every live split shares into the cached prefix."""
        trie = self.trie
        nodes = [s.node for s in self._splits]
        if not nodes:
            return
        paths = [n.path_from(trie.root) for n in nodes]
        shared = 0
        while all(len(p) > shared for p in paths) and all(p[shared] is paths[0][shared] for p in paths):
            shared += 1
        if shared >= self.root_lag:
            new_root = paths[0][shared - 1]
            # Weights below the root stay relative to the old one: only ratios are used.
            trie.advance_root(new_root)


class ByteMixture:
    """Next-byte mixture of byte-level models (e.g. tokenized models with different vocabularies).

    ``rule="fixed"``: P(b | x) = sum_k w_k P_k(b | x) with constant weights w.
    ``rule="bayes"``: the weights are the posterior of the models given the
    bytes so far, w_k(x) = pi_k P_k(x) / sum_j pi_j P_j(x) (prior pi =
    `weights`), so the mixture is the Bayesian model average: its probability
    of a whole byte string is P(x) = sum_k pi_k P_k(x), and its bits/byte is
    at most the best model's plus log2(1 / pi_best) / len(x).
    """

    def __init__(self, models: Sequence[NextByteModel], weights: Sequence[float] | None = None, rule: str = "fixed") -> None:
        if not models:
            raise ValueError("ByteMixture needs at least one model")
        w = np.ones(len(models)) if weights is None else np.asarray(weights, np.float64)
        if w.shape != (len(models),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be {len(models)} non-negative numbers with a positive sum")
        if rule not in ("fixed", "bayes"):
            raise ValueError(f"rule={rule!r}: use 'fixed' or 'bayes'")
        self.models = list(models)
        self.prior = w / w.sum()
        self.rule = rule
        self.weights = self.prior.copy()  # current weights (the posterior under 'bayes')
        self._probs: list[np.ndarray] | None = None  # [K][257] cached for the current text

    def reset(self, prompt: bytes | str) -> None:
        for m in self.models:
            m.reset(prompt)
        self.weights = self.prior.copy()
        self._probs = None

    def component_probs(self) -> list[np.ndarray]:
        """Each model's next-byte distribution ``[257]`` at the current text."""
        if self._probs is None:
            self._probs = [m.next_byte_probs() for m in self.models]
        return self._probs

    def next_byte_probs(self) -> np.ndarray:
        return sum(w * p for w, p in zip(self.weights, self.component_probs()))

    def advance(self, byte: int) -> None:
        if self.rule == "bayes":
            # Posterior update: w_k <- w_k P_k(byte | x) / sum_j w_j P_j(byte | x).
            lik = np.array([p[int(byte)] for p in self.component_probs()])
            post = self.weights * lik
            if post.sum() <= 0:
                raise ValueError(f"every model gives byte {int(byte):#04x} probability zero")
            self.weights = post / post.sum()
        for m in self.models:
            m.advance(byte)
        self._probs = None


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
        out[j] = math.log(p[b]) if p[b] > 0 else _NEG_INF
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


@dataclasses.dataclass
class ByteSample:
    data: bytes  # generated bytes (a stop byte included when it ended the sample)
    logprobs: list[float]  # log P(byte | text before it) per generated byte (and the end, if sampled)
    stopped: bool  # the end-of-text outcome was sampled

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


def sample_bytes(
    model: NextByteModel,
    prompt: bytes | str,
    max_new_bytes: int,
    temperature: float = 0.0,
    seed: int = 0,
    stop_bytes: bytes = b"",
) -> ByteSample:
    """Sample bytes after `prompt`: greedy when ``temperature == 0``, else from
    P(b | x)^(1/T) normalized. Ends at the end-of-text outcome, after a byte
    in `stop_bytes`, or after `max_new_bytes` bytes (possibly inside a token
    or a character)."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy)")
    rng = np.random.default_rng(seed)
    model.reset(prompt)
    out = bytearray()
    logprobs: list[float] = []
    stopped = False
    while len(out) < max_new_bytes:
        p = model.next_byte_probs()
        if temperature == 0:
            b = int(np.argmax(p))
        else:
            with np.errstate(divide="ignore"):
                lg = np.log(p) / temperature
            q = np.exp(lg - lg.max())
            b = int(rng.choice(257, p=q / q.sum()))
        logprobs.append(math.log(p[b]))
        if b == STOP:
            stopped = True
            break
        out.append(b)
        if len(out) < max_new_bytes and b not in stop_bytes:
            model.advance(b)
        if b in stop_bytes:
            break
    return ByteSample(bytes(out), logprobs, stopped)
