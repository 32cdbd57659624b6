"""Token-tree speculative decoding with Gemma 3 270M as the target: presets of
``configs/speculative.py`` (same keys, same job), with a tree method as the default.

    python -m tokax.run --config configs/tree.py:dyspec --config.max_new_tokens=64 --config.json=True

Methods (``tokax.decode.proposers.tree_proposers``, the names of configs/speculative.py):
tree (a fixed template, ``branching`` children per depth, filled from the
draft), dyspec (the tree grown by draft path probability under a ``n_nodes``
budget in ``rounds`` draft passes), token_recycling (no draft: an adjacency
table of the target's past top-``table_k``, read along the ``branching``
template), spectr (``spectr_k`` i.i.d. draft chains of ``spectr_length``
tokens, k-sequential selection); configs/speculative.py also runs the tree
methods medusa and retrieval_tree. The draft is named by ``draft``: by default
the distilled draft shipped with tokax (configs/distill.py:draft). All are lossless.
"""

from configs.speculative import get_config as _speculative

METHODS = ("tree", "dyspec", "token_recycling", "spectr")


def get_config(arg=None):
    if arg not in (None, "") and arg not in METHODS:
        raise ValueError(f"configs/tree.py: unknown arg {arg!r}; use one of {', '.join(METHODS)}")
    return _speculative(arg or "tree")
