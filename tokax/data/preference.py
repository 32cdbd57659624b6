"""A code preference task scored without humans, and the JSONL files examples live in.

``build_code_preference_task`` makes deterministic (prompt, chosen, rejected) examples
from stdlib functions: chosen is the real next line, rejected a plausible but wrong one.
A model "prefers" chosen when its log-prob of chosen given the prompt is higher, so the
task needs no labels. ``preference_to_unpaired`` turns pairs into KTO / BCO examples.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
from collections.abc import Mapping, Sequence
from typing import Any

from tokax.data.stdlib import read_source, stdlib_files
from tokax.errors import InputError

__all__ = [
    "DataFileError",
    "build_code_preference_task",
    "preference_to_unpaired",
    "read_jsonl",
    "write_jsonl",
    "file_digest",
]


class DataFileError(InputError):
    """A data file that is missing or malformed; the message names the file and line."""


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
        fns.extend(_functions(read_source(f)))
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
