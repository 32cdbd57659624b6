"""Training batches: tokenizers, packed SFT batches, preference and unpaired batches.

Everything here is host-side numpy and deterministic: the order of examples
is a function of ``(seed, epoch)`` only, and an iterator's whole position is
a small dict (``state()``) that the checkpoint stores, so a resumed run reads
exactly the batches an uninterrupted run would have read.

Batches are dicts of numpy arrays with a leading micro-batch axis for
gradient accumulation: ``[A, b, T]`` (A micro-batches of b rows of T tokens).

* SFT / distillation (``PackedTextIterator``): documents, each ``[bos] + text +
  [eos]``, are packed greedily into rows of T tokens. A document that does not
  fit in the rest of a row continues in the next row as a new segment. Each
  segment has its own ``segment_ids`` value (1, 2, ...; 0 = padding) and
  positions restarting at 0, so attention never crosses documents.
  ``targets[t] = tokens[t + 1]`` within a segment and ``mask[t]`` is 1 where
  that target exists (the last token of a segment predicts nothing).
* Preference (``PreferenceIterator``): (prompt, chosen, rejected) -> two
  sequences ``[bos] + prompt + completion + [eos]`` padded to T (position -1),
  with the loss mask on completion targets only.
* Unpaired (KTO / BCO): (prompt, completion, label) -> one such sequence per
  example, plus KTO's mismatched pairs (prompt_i, completion_{i+1 mod b}).

The texts come from ``tokax.data``: pieces of the standard-library corpus
(``tokax.data.stdlib``) and the code preference task (``tokax.data.preference``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from tokax.data.stdlib import read_source, stdlib_files
from tokax.errors import InputError

__all__ = [
    "TokenizerLike",
    "ByteTokenizer",
    "get_tokenizer",
    "PackedTextIterator",
    "pack_documents",
    "encode_preference",
    "encode_unpaired",
    "PreferenceIterator",
    "UnpairedIterator",
    "BadExampleError",
]

log = logging.getLogger(__name__)


class TokenizerLike(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class BadExampleError(InputError):
    """A training example that cannot be turned into a valid batch row."""


# ----------------------------------------------------------------------------
# tokenizers
# ----------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as tokens, after 4 special ids (pad 0, unk 1, bos 2, eos 3): vocab 260.

    Needs no training; used by fast tests.
    """

    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3
    vocab_size = 260

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [b + 4 for b in text.encode("utf-8")]
        return [self.bos_id] + ids if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) - 4 for i in ids if int(i) >= 4).decode("utf-8", errors="replace")


def get_tokenizer(kind: str, vocab_size: int = 1024, cache_dir: str | None = None) -> Any:
    """'bytes' (ByteTokenizer), 'spm' (stdlib-trained BPE of ``vocab_size``,
    cached as ``cache_dir/stdlib_bpe_<V>.model``) or 'gemma3' (Gemma 3's own)."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "gemma3":
        from tokax.tokenize import load_gemma3_tokenizer

        return load_gemma3_tokenizer()
    if kind == "spm":
        from tokax.tokenize import Tokenizer, train_code_tokenizer

        path = os.path.join(cache_dir or ".", f"stdlib_bpe_{int(vocab_size)}.model")
        if os.path.exists(path):
            return Tokenizer.from_file(path)
        files = stdlib_files("train")
        # A fixed, spread-out sample (every 4th file) keeps training to seconds.
        texts = [read_source(f) for f in files[::4]]
        return train_code_tokenizer(texts, vocab_size, path)
    raise ValueError(f"data.tokenizer={kind!r}: use 'bytes', 'spm' or 'gemma3'")


# ----------------------------------------------------------------------------
# packed SFT batches
# ----------------------------------------------------------------------------


def pack_documents(docs: Sequence[Sequence[int]], rows: int, seq_len: int) -> dict[str, np.ndarray]:
    """Pack whole token lists (each at most ``seq_len``) into ``rows`` rows, padding the rest.

    Reference packer for eval and tests: documents are placed in order,
    a new row starts when the next one does not fit. Same fields as
    ``PackedTextIterator`` batches, without the micro-batch axis.
    """
    out = _empty_rows(rows, seq_len)
    r, col, seg = 0, 0, 0
    for d in docs:
        if len(d) > seq_len:
            raise ValueError(f"document of {len(d)} tokens does not fit seq_len={seq_len}")
        if col + len(d) > seq_len:
            r, col, seg = r + 1, 0, 0
        if r >= rows:
            break
        seg += 1
        _place(out, r, col, list(d), seg)
        col += len(d)
    return out


def _empty_rows(rows: int, seq_len: int) -> dict[str, np.ndarray]:
    return {
        "tokens": np.zeros((rows, seq_len), np.int32),
        "targets": np.zeros((rows, seq_len), np.int32),
        "positions": np.full((rows, seq_len), -1, np.int32),
        "segment_ids": np.zeros((rows, seq_len), np.int32),
        "mask": np.zeros((rows, seq_len), np.float32),
    }


def _place(out: dict[str, np.ndarray], r: int, col: int, toks: list[int], seg: int) -> None:
    n = len(toks)
    sl = slice(col, col + n)
    out["tokens"][r, sl] = toks
    out["targets"][r, col : col + n - 1] = toks[1:]
    out["positions"][r, sl] = np.arange(n)
    out["segment_ids"][r, sl] = seg
    out["mask"][r, col : col + n - 1] = 1.0


class PackedTextIterator:
    """Endless packed batches ``[A, b, T]`` over a list of text pieces.

    Epoch e visits the pieces in ``permutation(seed, e)``; ``state()`` is
    ``{'epoch', 'index', 'offset'}`` (the piece being read and the token
    offset inside it) and ``PackedTextIterator(..., state=s)`` continues
    exactly from there. With ``shuffle=False`` pieces are read in order
    (eval).
    """

    def __init__(self, pieces: Sequence[str], tokenizer: Any, seq_len: int, batch_size: int,
                 grad_accum: int = 1, seed: int = 0, state: Mapping[str, int] | None = None,
                 shuffle: bool = True) -> None:
        if batch_size % grad_accum:
            raise ValueError(f"data.batch_size={batch_size} must be a multiple of grad_accum={grad_accum}")
        if seq_len < 2:
            raise ValueError(f"data.seq_len={seq_len} must be >= 2")
        if not pieces:
            raise ValueError("PackedTextIterator got no documents")
        self.pieces, self.tok = list(pieces), tokenizer
        self.seq_len, self.batch_size, self.grad_accum = int(seq_len), int(batch_size), int(grad_accum)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        st = dict(state or {"epoch": 0, "index": 0, "offset": 0})
        self.epoch, self.index, self.offset = int(st["epoch"]), int(st["index"]), int(st["offset"])
        self._perm_epoch, self._perm = -1, None
        self._cache_key, self._cache = None, None

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "offset": self.offset}

    def _order(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            n = len(self.pieces)
            self._perm = (np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle
                          else np.arange(n))
            self._perm_epoch = self.epoch
        return self._perm

    def _doc(self) -> list[int]:
        key = (self.epoch, self.index)
        if self._cache_key != key:
            text = self.pieces[int(self._order()[self.index])]
            self._cache = [self.tok.bos_id] + list(self.tok.encode(text)) + [self.tok.eos_id]
            self._cache_key = key
        return self._cache

    def _advance_doc(self) -> None:
        self.index, self.offset = self.index + 1, 0
        if self.index >= len(self.pieces):
            self.epoch, self.index = self.epoch + 1, 0

    def _row(self, out: dict[str, np.ndarray], r: int) -> None:
        col, seg = 0, 0
        while col < self.seq_len:
            doc = self._doc()
            take = min(self.seq_len - col, len(doc) - self.offset)
            if take < 2 and self.offset == 0 and col > 0:
                break  # a 1-token tail segment would predict nothing: leave it padded
            seg += 1
            _place(out, r, col, doc[self.offset : self.offset + take], seg)
            col += take
            self.offset += take
            if self.offset >= len(doc):
                self._advance_doc()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        out = _empty_rows(self.batch_size, self.seq_len)
        for r in range(self.batch_size):
            self._row(out, r)
        b = self.batch_size // self.grad_accum
        return {k: v.reshape(self.grad_accum, b, *v.shape[1:]) for k, v in out.items()}


# ----------------------------------------------------------------------------
# preference / unpaired examples
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """One tokenized (prompt, completion): ids and where the completion starts."""

    ids: tuple[int, ...]
    prompt_len: int
    truncated: bool


def _encode_pair(tok: Any, prompt: str, completion: str, seq_len: int, where: str) -> Encoded:
    if not isinstance(completion, str) or not completion.strip():
        raise BadExampleError(
            f"{where}: empty completion; every preference / unpaired example needs a non-empty "
            f"completion (drop the example or fix the data)"
        )
    p = [tok.bos_id] + list(tok.encode(prompt))
    c = list(tok.encode(completion)) + [tok.eos_id]
    if len(p) >= seq_len:
        raise BadExampleError(
            f"{where}: prompt has {len(p)} tokens but data.seq_len={seq_len} leaves no room for the "
            f"completion; raise data.seq_len or shorten the prompt"
        )
    truncated = len(p) + len(c) > seq_len
    c = c[: seq_len - len(p)]  # keep the start of the completion (TRL's keep_start)
    return Encoded(tuple(p + c), len(p), truncated)


def _row_arrays(e: Encoded, seq_len: int) -> tuple[np.ndarray, ...]:
    """tokens, targets, positions (-1 = pad), completion mask over targets; each [T]."""
    ids = np.asarray(e.ids, np.int32)
    n = len(ids)
    tokens = np.zeros(seq_len, np.int32)
    targets = np.zeros(seq_len, np.int32)
    positions = np.full(seq_len, -1, np.int32)
    mask = np.zeros(seq_len, np.float32)
    tokens[: n - 1] = ids[:-1]  # the last token is only a target
    targets[: n - 1] = ids[1:]
    positions[: n - 1] = np.arange(n - 1)
    mask[e.prompt_len - 1 : n - 1] = 1.0  # targets that are completion tokens
    return tokens, targets, positions, mask


def _bad(policy: str, err: BadExampleError, skipped: list[str]) -> None:
    if policy == "error":
        raise err
    if policy != "skip":
        raise ValueError(f"data.bad_examples={policy!r}: use 'error' or 'skip'")
    log.warning("skipping bad example: %s", err)
    skipped.append(str(err))


def encode_preference(examples: Sequence[Mapping[str, str]], tok: Any, seq_len: int,
                      bad_examples: str = "error") -> tuple[list[tuple[Encoded, Encoded]], list[str]]:
    """Tokenize (prompt, chosen, rejected) examples; returns (pairs, skip reasons).

    A missing field, an empty chosen / rejected completion or a prompt that
    leaves no room for a completion raises ``BadExampleError`` (naming the
    example and the fix) with ``bad_examples='error'``, or is logged and left
    out with ``'skip'``. Completions that do not fit are cut to fit.
    """
    pairs, skipped = [], []
    for i, ex in enumerate(examples):
        try:
            missing = [k for k in ("prompt", "chosen", "rejected") if k not in ex]
            if missing:
                raise BadExampleError(f"preference example {i}: missing field(s) {missing}")
            c = _encode_pair(tok, ex["prompt"], ex["chosen"], seq_len, f"preference example {i} field 'chosen'")
            r = _encode_pair(tok, ex["prompt"], ex["rejected"], seq_len, f"preference example {i} field 'rejected'")
        except BadExampleError as err:
            _bad(bad_examples, err, skipped)
            continue
        pairs.append((c, r))
    if not pairs:
        raise BadExampleError(f"no usable preference examples out of {len(examples)}")
    return pairs, skipped


def encode_unpaired(examples: Sequence[Mapping[str, Any]], tok: Any, seq_len: int,
                    bad_examples: str = "error") -> tuple[list[tuple[Encoded, bool]], list[str]]:
    """Tokenize (prompt, completion, label) examples (label: desirable or not); see ``encode_preference``."""
    out, skipped = [], []
    for i, ex in enumerate(examples):
        try:
            missing = [k for k in ("prompt", "completion", "label") if k not in ex]
            if missing:
                raise BadExampleError(f"unpaired example {i}: missing field(s) {missing}")
            e = _encode_pair(tok, ex["prompt"], ex["completion"], seq_len, f"unpaired example {i} field 'completion'")
        except BadExampleError as err:
            _bad(bad_examples, err, skipped)
            continue
        out.append((e, bool(ex["label"])))
    if not out:
        raise BadExampleError(f"no usable unpaired examples out of {len(examples)}")
    return out, skipped


class _EpochIterator:
    """Batches of example indices, reshuffled each epoch from (seed, epoch); state {'epoch', 'index'}."""

    def __init__(self, n: int, batch_size: int, grad_accum: int, seed: int,
                 state: Mapping[str, int] | None, shuffle: bool) -> None:
        if batch_size % grad_accum:
            raise ValueError(f"data.batch_size={batch_size} must be a multiple of grad_accum={grad_accum}")
        if n < batch_size:
            raise ValueError(f"only {n} usable examples for data.batch_size={batch_size}")
        self.n, self.batch_size, self.grad_accum = n, int(batch_size), int(grad_accum)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        st = dict(state or {"epoch": 0, "index": 0})
        self.epoch, self.index = int(st["epoch"]), int(st["index"])

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def _take(self) -> np.ndarray:
        if self.index + self.batch_size > self.n:  # drop the remainder: equal-size batches
            self.epoch, self.index = self.epoch + 1, 0
        perm = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle
                else np.arange(self.n))
        idx = perm[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        return idx

    def __iter__(self):
        return self


class PreferenceIterator(_EpochIterator):
    """Batches of ``chosen_*`` / ``rejected_*`` fields (tokens, targets,
    positions, mask), each ``[A, b, T]``."""

    def __init__(self, pairs: Sequence[tuple[Encoded, Encoded]], seq_len: int, batch_size: int,
                 grad_accum: int = 1, seed: int = 0, state: Mapping[str, int] | None = None,
                 shuffle: bool = True) -> None:
        super().__init__(len(pairs), batch_size, grad_accum, seed, state, shuffle)
        self.pairs, self.seq_len = list(pairs), int(seq_len)

    def __next__(self) -> dict[str, np.ndarray]:
        idx = self._take()
        out: dict[str, np.ndarray] = {}
        for side, j in (("chosen", 0), ("rejected", 1)):
            rows = [_row_arrays(self.pairs[i][j], self.seq_len) for i in idx]
            for name, arr in zip(("tokens", "targets", "positions", "mask"), zip(*rows)):
                out[f"{side}_{name}"] = np.stack(arr)
        b = self.batch_size // self.grad_accum
        return {k: v.reshape(self.grad_accum, b, *v.shape[1:]) for k, v in out.items()}


class UnpairedIterator(_EpochIterator):
    """Batches of tokens / targets / positions / mask ``[A, b, T]``, ``desirable [A, b]`` and
    KTO's mismatched pairs ``kl_*`` (prompt_i with completion_{i+1 mod b} in the same micro-batch)."""

    def __init__(self, examples: Sequence[tuple[Encoded, bool]], seq_len: int, batch_size: int,
                 grad_accum: int = 1, seed: int = 0, state: Mapping[str, int] | None = None,
                 shuffle: bool = True) -> None:
        super().__init__(len(examples), batch_size, grad_accum, seed, state, shuffle)
        self.examples, self.seq_len = list(examples), int(seq_len)

    def __next__(self) -> dict[str, np.ndarray]:
        idx = self._take()
        b = self.batch_size // self.grad_accum
        encs = [self.examples[i][0] for i in idx]
        mism = []
        for a in range(self.grad_accum):
            grp = encs[a * b : (a + 1) * b]
            for k, e in enumerate(grp):
                other = grp[(k + 1) % b]
                comp = list(other.ids[other.prompt_len :])[: self.seq_len - e.prompt_len]
                mism.append(Encoded(tuple(e.ids[: e.prompt_len]) + tuple(comp), e.prompt_len, False))
        out: dict[str, np.ndarray] = {"desirable": np.asarray([self.examples[i][1] for i in idx], np.bool_)}
        for prefix, group in (("", encs), ("kl_", mism)):
            rows = [_row_arrays(e, self.seq_len) for e in group]
            for name, arr in zip(("tokens", "targets", "positions", "mask"), zip(*rows)):
                out[prefix + name] = np.stack(arr)
        return {k: v.reshape(self.grad_accum, b, *v.shape[1:]) for k, v in out.items()}
