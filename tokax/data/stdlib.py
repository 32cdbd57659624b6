"""The Python standard library's own source files as a corpus (no download needed).

Files come from ``os.path.dirname(os.__file__)``, minus test suites, site-packages and
machine-generated files, with a fixed held-out split by a hash of each file's relative
path (``split_of``), so the split does not depend on which other files a Python build
ships. Training cuts them into pieces at top-level statements (``corpus_pieces``); code
prompts are the openings of documented functions (``function_prefixes``); retrieval
datastores read whole files as token arrays (``stdlib_docs``).
"""

from __future__ import annotations

import ast
import os
import random
import textwrap
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "stdlib_root",
    "split_of",
    "stdlib_files",
    "read_source",
    "function_prefixes",
    "training_function_prefixes",
    "corpus_pieces",
    "frequent_token_ids",
    "token_docs",
    "stdlib_docs",
]

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


def read_source(path: str) -> str:
    """A source file's text (UTF-8; undecodable bytes become U+FFFD)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def function_prefixes(paths: Sequence[str], min_lines: int = 12, max_lines: int = 25,
                      per_file: int | None = None) -> list[str]:
    """Code-completion prompts: the opening of each function or method of ``paths`` (in
    ``ast.walk`` order) that has a docstring and at least ``min_lines`` lines, dedented: its
    first third (3 to ``max_lines`` lines: signature, docstring head, the body's first lines).
    ``per_file``: at most that many per file. Files that do not parse are skipped."""
    out = []
    for path in paths:
        src = read_source(path)
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
        out.extend(_pieces(read_source(f), target_chars))
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


def token_docs(tokenizer: Any, paths: Sequence[str]) -> list[np.ndarray]:
    """Each file of ``paths`` as one token array, ``[bos] + text`` (int32)."""
    return [np.asarray(tokenizer.encode(read_source(p), add_bos=True), np.int32) for p in paths]


def stdlib_docs(tokenizer: Any, split: str = "train") -> list[np.ndarray]:
    """Every stdlib file of ``split`` as one token array (``token_docs``): a retrieval datastore's documents."""
    return token_docs(tokenizer, stdlib_files(split))
