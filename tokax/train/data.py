"""Training data: corpus, tokenizers, packed SFT batches and preference batches.

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

The corpus needs no download: the Python standard library's own source
files (``os.path.dirname(os.__file__)``), cut into pieces at top-level
statements, with a fixed held-out split by a hash of each file's path.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import logging
import os
import random
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from tokax.errors import InputError

__all__ = [
    "TokenizerLike",
    "ByteTokenizer",
    "train_code_tokenizer",
    "get_tokenizer",
    "stdlib_files",
    "split_of",
    "corpus_pieces",
    "PackedTextIterator",
    "pack_documents",
    "encode_preference",
    "encode_unpaired",
    "PreferenceIterator",
    "UnpairedIterator",
    "build_code_preference_task",
    "read_jsonl",
    "write_jsonl",
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


class DataFileError(InputError):
    """A data file that is missing or malformed; the message names the file and line."""


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


def train_code_tokenizer(texts: Sequence[str], vocab_size: int, path: str | os.PathLike[str]) -> Any:
    """Train a byte-fallback BPE sentencepiece model on ``texts`` and save it at ``path``.

    Ids: pad 0, unk 1, bos 2, eos 3; ``\\n`` is a piece of its own and runs
    of spaces are kept (code indentation), no text normalisation, no dummy
    prefix. Deterministic for fixed texts (one thread, no input sampling).
    Returns a ``tokax.tokenize.Tokenizer``.
    """
    import sentencepiece as spm

    from tokax.tokenize import Tokenizer

    lines = [ln for t in texts for ln in t.split("\n") if ln.strip()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=int(vocab_size),
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.9995,  # rare characters fall back to byte pieces
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=["\n"],
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        num_threads=1,
        minloglevel=2,
    )
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a model
    return Tokenizer(buf.getvalue())


def get_tokenizer(kind: str, vocab_size: int = 1024, cache_dir: str | None = None) -> Any:
    """'bytes' (ByteTokenizer), 'spm' (stdlib-trained BPE of ``vocab_size``,
    cached as ``cache_dir/stdlib_bpe_<V>.model``) or 'gemma3' (Gemma 3's own)."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "gemma3":
        from tokax.tokenize import load_gemma3_tokenizer

        return load_gemma3_tokenizer()
    if kind == "spm":
        from tokax.tokenize import Tokenizer

        path = os.path.join(cache_dir or ".", f"stdlib_bpe_{int(vocab_size)}.model")
        if os.path.exists(path):
            return Tokenizer.from_file(path)
        files = stdlib_files("train")
        # A fixed, spread-out sample (every 4th file) keeps training to seconds.
        texts = [_read(f) for f in files[::4]]
        return train_code_tokenizer(texts, vocab_size, path)
    raise ValueError(f"data.tokenizer={kind!r}: use 'bytes', 'spm' or 'gemma3'")


# ----------------------------------------------------------------------------
# corpus: the Python standard library
# ----------------------------------------------------------------------------

_EXCLUDE_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
# Generated files that are not Python source. pydoc_data/topics.py (the reference manual as a dict of
# strings) is also where benchmarks/speculative.py takes its prose prompts: kept out of every split.
_EXCLUDE_FILES = {os.path.join("pydoc_data", "topics.py")}


def stdlib_root() -> str:
    return os.path.dirname(os.__file__)


def split_of(relpath: str, eval_percent: int = 5) -> str:
    """'eval' for a fixed ~``eval_percent``% of files (by CRC32 of the path), else 'train'."""
    return "eval" if zlib.crc32(relpath.replace(os.sep, "/").encode()) % 100 < eval_percent else "train"


def stdlib_files(split: str = "train", eval_percent: int = 5, root: str | None = None) -> list[str]:
    """Sorted paths of the standard library's ``.py`` source files in ``split``.

    Test suites, site-packages and machine-generated files (``_sysconfigdata*``,
    ``pydoc_data/topics.py``) are left out; the split is by path hash so it does not depend on which
    other files a Python build ships.
    """
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split={split!r}: use 'train', 'eval' or 'all'")
    root = root or stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDE_DIRS and not d.startswith("config-"))
        for fn in sorted(filenames):
            if not fn.endswith(".py") or fn.startswith("_sysconfigdata"):
                continue
            full = os.path.join(dirpath, fn)
            rel = os.path.relpath(full, root)
            if rel in _EXCLUDE_FILES:
                continue
            if split == "all" or split_of(rel, eval_percent) == split:
                out.append(full)
    return sorted(out)


def function_prefixes(paths: Sequence[str], min_lines: int = 12, max_lines: int = 25,
                      per_file: int | None = None) -> list[str]:
    """Code-completion prompts: the opening of each function or method of ``paths`` (in
    ``ast.walk`` order) that has a docstring and at least ``min_lines`` lines, dedented: its
    first third (3 to ``max_lines`` lines: signature, docstring head, the body's first lines).
    ``per_file``: at most that many per file. Files that do not parse are skipped."""
    import textwrap

    out = []
    for path in paths:
        src = _read(path)
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        lines = src.splitlines(keepends=True)
        taken = 0
        for node in ast.walk(tree):
            if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node)
                    and node.end_lineno - node.lineno + 1 >= min_lines):
                body = lines[node.lineno - 1: node.end_lineno]
                cut = max(3, len(body) // 3)
                out.append(textwrap.dedent("".join(body[: min(cut, max_lines)])))
                taken += 1
                if per_file is not None and taken >= per_file:
                    break
    return out


def training_function_prefixes(seed: int = 0) -> list[str]:
    """``function_prefixes`` of the stdlib's training split, shuffled with ``seed``: the
    prompts of the shipped greedy corpus (``experiments/build_greedy_corpus.py``), in its order."""
    prompts = function_prefixes(stdlib_files("train"))
    random.Random(seed).shuffle(prompts)
    return prompts


def greedy_code_pairs(tokenizer: Any, prompt_tokens: int = 256) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(prompt ids, continuation ids)`` for every document of the shipped greedy corpus:
    the prompt as Gemma 3 270M read it (``[bos] + text``, its last ``prompt_tokens``) and the
    64 tokens it then wrote greedily. Training data for drafts and acceptance heads that
    should predict what this target writes, in the contexts it writes them. Checks that each
    document's stored context ends its prompt (the corpus and the prompts agree)."""
    from tokax import ASSETS_DIR
    from tokax.decode.proposers.retrieval import GREEDY_CORPUS, greedy_corpus_docs

    docs = greedy_corpus_docs()
    ctx = int(json.loads((ASSETS_DIR / GREEDY_CORPUS / "summary.json").read_text())["context"])
    prompts = training_function_prefixes()[: len(docs)]
    out = []
    for i, (text, doc) in enumerate(zip(prompts, docs)):
        ids = np.asarray(tokenizer.encode(text, add_bos=True)[-prompt_tokens:], np.int32)
        if not np.array_equal(ids[-ctx:], doc[:ctx]):
            raise ValueError(f"greedy corpus document {i} does not continue prompt {i}: "
                             "the corpus and the stdlib on this machine disagree")
        out.append((ids, np.asarray(doc[ctx:], np.int32)))
    return out


def continuation_batch(pairs: Sequence[tuple[np.ndarray, np.ndarray]], length: int | None = None):
    """Arrays for a batch of ``(prompt, continuation)`` pairs (``greedy_code_pairs``): tokens
    ``[B, L]`` (prompt then continuation, right-padded with 0), real lengths ``[B]``, the
    position before each continuation token ``at [B, C]`` (where a draft predicts it) and the
    continuation tokens ``[B, C]``. ``L`` = ``length`` or the longest pair."""
    C = len(pairs[0][1])
    L = length or max(len(p) + len(c) for p, c in pairs)
    toks = np.zeros((len(pairs), L), np.int32)
    lengths = np.zeros((len(pairs),), np.int32)
    at = np.zeros((len(pairs), C), np.int32)
    for b, (p, c) in enumerate(pairs):
        if len(c) != C:
            raise ValueError("continuations of different lengths in one batch")
        toks[b, :len(p)], toks[b, len(p):len(p) + C] = p, c
        lengths[b] = len(p) + C
        at[b] = len(p) - 1 + np.arange(C)
    return toks, lengths, at, np.stack([np.asarray(c, np.int32) for _, c in pairs])


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _pieces(text: str, target_chars: int) -> list[str]:
    """Cut source text into pieces of about ``target_chars`` at top-level
    statements (a line that starts in column 0 and is not a comment or a
    closing bracket), so a piece is mostly whole definitions."""
    lines = text.splitlines(keepends=True)
    out, cur, size = [], [], 0
    for ln in lines:
        top = ln[:1] not in ("", " ", "\t", "#", "\n", ")", "]", "}") and not ln.startswith(("else", "elif", "except", "finally"))
        if cur and ((size >= target_chars and top) or size >= 4 * target_chars):
            out.append("".join(cur))
            cur, size = [], 0
        cur.append(ln)
        size += len(ln)
    if cur:
        out.append("".join(cur))
    return [p for p in out if p.strip()]


def corpus_pieces(split: str = "train", target_chars: int = 2000, max_files: int | None = None,
                  eval_percent: int = 5) -> list[str]:
    """The stdlib corpus of ``split`` as a list of text pieces (the packing unit)."""
    files = stdlib_files(split, eval_percent)
    if max_files:
        files = files[: int(max_files)]
    out: list[str] = []
    for f in files:
        out.extend(_pieces(_read(f), target_chars))
    if not out:
        raise ValueError(f"the stdlib corpus split {split!r} is empty (stdlib at {stdlib_root()})")
    return out


def frequent_token_ids(tok: Any, n: int, split: str = "train", max_files: int | None = None) -> np.ndarray:
    """The ``n`` most frequent token ids of the stdlib corpus ``split`` under
    ``tok`` (ties broken by id), sorted by id: the vocabulary of a draft head
    over a frequent-token subset. BOS/EOS are always included, since a draft
    must be able to end a sequence the way its target does."""
    vocab = int(tok.vocab_size)
    if not 1 <= n <= vocab:
        raise ValueError(f"head vocabulary n={n} must be in [1, {vocab}] (the tokenizer's vocabulary)")
    counts = np.zeros(vocab, np.int64)
    for piece in corpus_pieces(split, max_files=max_files):
        counts += np.bincount(np.asarray(tok.encode(piece), np.int64), minlength=vocab)[:vocab]
    for special in (getattr(tok, "bos_id", None), getattr(tok, "eos_id", None)):
        if special is not None and 0 <= int(special) < vocab:
            counts[int(special)] = counts.max() + 1
    order = np.lexsort((np.arange(vocab), -counts))  # most frequent first, then lower id
    return np.sort(order[:n]).astype(np.int32)


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


# ----------------------------------------------------------------------------
# a preference task scored without humans: real vs corrupted code continuations
# ----------------------------------------------------------------------------


def _functions(src: str) -> list[list[str]]:
    """Source lines of every (async) function in ``src`` that parses, with >= 3 body lines."""
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError):
        return []
    lines = src.splitlines()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno:
            fn = lines[node.lineno - 1 : node.end_lineno]
            if len(fn) >= 4:
                out.append(fn)
    return out


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def build_code_preference_task(split: str = "train", n: int = 2000, seed: int = 0, context_lines: int = 8,
                               max_line_chars: int = 100) -> list[dict[str, str]]:
    """Deterministic (prompt, chosen, rejected) examples from stdlib functions.

    prompt = up to ``context_lines`` lines of a function (always starting at
    its ``def`` line when it fits), chosen = the real next line, rejected =
    with equal probability (a) a line from another function, re-indented to
    the real line's indentation (plausible code, wrong place) or (b) the real
    line with its words shuffled (the right tokens, broken code). The task
    is scored without humans: a model "prefers" chosen when its log-prob of
    chosen given the prompt is higher. Each example has a ``kind`` field
    ('other_function' or 'shuffled'). Files come from ``split`` of the corpus,
    so train and eval examples never share a source file.
    """
    rng = random.Random(f"{seed}:{split}")
    fns = []
    for f in stdlib_files(split):
        fns.extend(_functions(_read(f)))
    if len(fns) < 2:
        raise ValueError(f"too few functions in the {split!r} split to build the task")
    body_lines = [ln for fn in fns for ln in fn[1:] if 8 <= len(ln.strip()) <= max_line_chars and not ln.strip().startswith("#")]
    out: list[dict[str, str]] = []
    seen = set()
    tries = 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        fn = fns[rng.randrange(len(fns))]
        k = rng.randrange(1, len(fn))  # index of the line to predict
        real = fn[k]
        s = real.strip()
        if not (8 <= len(s) <= max_line_chars) or s.startswith(("#", '"', "'")):
            continue
        start = 0 if k <= context_lines else k - context_lines
        prompt = "\n".join(fn[start:k]) + "\n"
        if rng.random() < 0.5:
            kind = "other_function"
            other = body_lines[rng.randrange(len(body_lines))].strip()
            if other == s:
                continue
            rejected = _indent(real) + other
        else:
            kind = "shuffled"
            words = s.split()
            if len(set(words)) < 2:
                continue
            perm = words[:]
            while perm == words:
                rng.shuffle(perm)
            rejected = _indent(real) + " ".join(perm)
        key = (prompt, real)
        if key in seen:
            continue
        seen.add(key)
        out.append({"prompt": prompt, "chosen": real + "\n", "rejected": rejected + "\n", "kind": kind})
    return out


def preference_to_unpaired(pairs: Sequence[Mapping[str, str]]) -> list[dict[str, Any]]:
    """KTO-style data from pairs: even-indexed pairs give their chosen (label True),
    odd ones their rejected (label False), so every prompt appears once and the
    labels are balanced."""
    out = []
    for i, ex in enumerate(pairs):
        good = i % 2 == 0
        out.append({"prompt": ex["prompt"], "completion": ex["chosen" if good else "rejected"], "label": good})
    return out


def write_jsonl(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> None:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one per non-blank line; a missing file, a line that is
    not JSON or not an object raises ``DataFileError`` naming the file and line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataFileError(f"{path}: no such file" if not os.path.exists(path) else f"{path}: not a file")
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFileError(f"{path}:{n}: not UTF-8 text (byte {e.start} of the line)") from e
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFileError(f"{path}:{n}: not a JSON object ({e.msg} at column {e.colno})") from e
            if not isinstance(row, dict):
                raise DataFileError(f"{path}:{n}: a JSON {type(row).__name__}, not an object")
            rows.append(row)
    return rows


def file_digest(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()[:16]
