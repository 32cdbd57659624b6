"""Corpora and tasks shared by decoding and training (host-side, deterministic, no download).

Modules (imported on demand; this package file stays light):

- ``stdlib``     the Python standard library's own source as a corpus: fixed train / eval
                 split by path hash, text pieces, function-opening prompts, token counts
- ``greedy``     the shipped greedy continuations of Gemma 3 270M on training-split code
- ``preference`` a code preference task scored without humans, JSONL files of examples

A leaf package: it imports ``tokax.errors`` (and ``tokax.ASSETS_DIR``), nothing from
``tokax.decode`` or ``tokax.train``.
"""
