"""Draft proposers for speculative decoding (``tokax.decode.speculative``).

A proposer is a frozen (hashable) dataclass, so the jitted decode loop can
take it as a static argument, with three pure functions over an explicit
state pytree:

* ``init(tparams, pparams, prompt, prompt_len, cache_len) -> pstate``
* ``propose(tparams, pparams, pstate, ctx, sp, rng) -> (Proposal, pstate)``:
  up to ``k`` draft tokens per row (``n [B]`` says how many are real; the
  rest are padding the verifier never accepts) and, for stochastic drafts,
  the draft logits ``q`` they were sampled from (``None`` for deterministic
  drafts such as n-gram lookup: the verifier then treats q as one-hot).
* ``update(pstate, ctx, n_draft, n_acc, live) -> pstate``: after the target
  accepted ``n_acc [B]`` drafts (roll a draft cache back, adapt n-gram sizes).
* optional, when the proposer sets ``uses_target_hidden = True``:
  ``observe_hidden(pstate, hidden [B, K+1, D], n_acc [B], live [B]) -> pstate``
  receives the target's final-normed hidden states of the verify block
  ``[last, x_1..x_K]``; ``hidden[b, n_acc[b]]`` is the state after the
  newest accepted token (heads on the frozen target draft from it).

``tparams`` are the target's params (self-speculative drafts reuse its
layers), ``pparams`` the proposer's own (a draft model, an adapter, a head;
``None`` when it has none). ``ctx`` is a ``Context``: the token history of
each row, prompt first, whose last token is the one the target has not yet
seen.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
from flax import struct

from tokax.decode.sampling import SamplingParams


@struct.dataclass
class Context:
    seq: jax.Array  # [B, S] prompt then generated tokens; index == position id
    seq_len: jax.Array  # [B] tokens in seq; seq[b, seq_len - 1] is the newest token
    live: jax.Array  # [B] bool, rows still generating


@struct.dataclass
class Proposal:
    tokens: jax.Array  # [B, K] draft tokens (padding past n)
    n: jax.Array  # [B] int32 number of real drafts, 0..K
    q_logits: jax.Array | None = None  # [B, K, V] draft logits (raw, before sampling processors)


class Proposer(Protocol):
    k: int

    def init(self, tparams: Any, pparams: Any, prompt: jax.Array, prompt_len: jax.Array, cache_len: int) -> Any: ...

    def propose(
        self, tparams: Any, pparams: Any, pstate: Any, ctx: Context, sp: SamplingParams, rng: jax.Array
    ) -> tuple[Proposal, Any]: ...

    def update(self, pstate: Any, ctx: Context, n_draft: jax.Array, n_acc: jax.Array, live: jax.Array) -> Any: ...


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


from tokax.decode.proposers.blockwise import BlockwiseProposer  # noqa: E402
from tokax.decode.proposers.draft_model import DraftModelProposer  # noqa: E402
from tokax.decode.proposers.kangaroo import KangarooProposer  # noqa: E402
from tokax.decode.proposers.lookahead import LookaheadProposer  # noqa: E402
from tokax.decode.proposers.ngram import ANPDProposer, PromptLookupProposer  # noqa: E402
from tokax.decode.proposers.retrieval import RetrievalProposer  # noqa: E402
from tokax.decode.proposers.specdec_pp import SpecDecPPProposer  # noqa: E402

__all__ = [
    "ANPDProposer",
    "BlockwiseProposer",
    "Context",
    "DraftModelProposer",
    "KangarooProposer",
    "LookaheadProposer",
    "PromptLookupProposer",
    "Proposal",
    "Proposer",
    "RetrievalProposer",
    "SpecDecPPProposer",
    "load_params",
    "save_params",
]
