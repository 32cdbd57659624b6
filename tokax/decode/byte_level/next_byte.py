"""Exact next-byte distributions of a tokenized language model (`ByteLM`).

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
`ByteLM` computes these distributions, one byte at a time.

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
holds the common prefix (the root; `tokax.decode.byte_level.trie`), and the
root moves down to the deepest node that every live split shares.

Starting from a prompt that ends inside a token: the live splits of the
prompt are found directly (positions i with some token starting with
x[i:]); the root is put at a position where no piece can span two adjacent
characters (`ByteVocab.joinable`), at or before the first live split, so the
canonical encodings of all later prefixes share the root's tokens.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from tokax.decode.byte_level.trie import _NEG_INF, TokenTrie, _logsumexp, _Node
from tokax.model.config import ModelConfig
from tokax.model.decoder import Params
from tokax.tokenize.byte_vocab import STOP, ByteVocab, split_utf8

__all__ = ["ByteLM"]


@dataclasses.dataclass
class _Split:
    """Covers whose last token starts at byte `start`: prefix `node`, last tokens `cand`."""

    start: int
    node: _Node
    cand: np.ndarray  # [M] token ids: valid after node, bytes start with x[start:n], longer than n - start
    logw: np.ndarray  # [M] float64 log Q(node) + log Q(t | node)


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
