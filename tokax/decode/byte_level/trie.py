"""Model states along a trie of token sequences that share one cached prefix.

Phan et al., "Exact Byte-Level Probabilities from Tokenized Language Models
for FIM-Tasks and Model Ensembles" (2024). The cover sum of
`tokax.decode.byte_level.next_byte` needs the model's next-token
distribution after many token sequences that share a long prefix and differ
in their last few tokens. `TokenTrie` holds that prefix (BOS, then the
prompt's tokens up to the root) in a KV cache, and the sequences below it as
a trie of nodes; the nodes that need logits are computed in one model call
that runs their paths from the root with a tree mask. The root moves down
(`advance_root`) as the text grows, so the paths stay a few tokens long.

Per node it computes the model's log p(next | node), the log Q(next | node)
of the byte-level rules (p masked to the valid next tokens of
`tokax.decode.byte_level.validity`, renormalized over them when
``renormalize=True``), log Q(stop | node), and log Q of the path from the
root (``logw``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tokax.decode.byte_level.validity import bpe_junctions
from tokax.errors import ContextTooLong
from tokax.model import kv_cache as kvc
from tokax.model.config import ModelConfig
from tokax.model.decoder import Params, forward, unembed
from tokax.tokenize.byte_vocab import ByteVocab

__all__ = ["TokenTrie"]

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
