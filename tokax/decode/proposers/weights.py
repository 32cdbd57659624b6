"""Saving and loading a proposer's trained weights (heads, an adapter, an acceptance head): one
``.npz`` of a nested dict of arrays, keys joined by '/'; a shipped asset adds a ``summary.json``."""

from __future__ import annotations

from typing import Any


def save_params(path: str, params: Any) -> None:
    """Save a nested dict of arrays (an adapter, a head) to one ``.npz``, keys joined by '/'."""
    import numpy as np

    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}/", v)
        else:
            flat[prefix[:-1]] = np.asarray(node)

    walk("", params)
    with open(path, "wb") as f:
        np.savez_compressed(f, **flat)


def save_asset(out_dir: str, filename: str, params: Any, summary: dict) -> None:
    """A trained asset as tokax ships them (``tokax/assets/<name>/``): ``params`` as
    ``out_dir/filename`` (``save_params``) and ``summary`` (how it was made, what it scored)
    as ``out_dir/summary.json``."""
    import json
    import os

    os.makedirs(out_dir, exist_ok=True)
    save_params(os.path.join(out_dir, filename), params)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


def load_params(path: str) -> dict:
    """Inverse of ``save_params``."""
    import jax.numpy as jnp
    import numpy as np

    out: dict = {}
    with np.load(path) as z:
        for key in z.files:
            node = out
            *parents, leaf = key.split("/")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = jnp.asarray(z[key])
    return out
