"""The proposer protocols of the speculative loops, with every optional hook declared.

A proposer is a frozen (hashable) dataclass, so a jitted loop takes it as a static
argument, with pure functions over an explicit state pytree. It subclasses one of the
two bases below and overrides what it needs; the loops call every hook, and the
defaults do nothing, so a loop never asks a proposer what it has.

``ChainProposer`` (``tokax.decode.speculative``): up to ``k`` draft tokens per row.

* ``init(tparams, pparams, prompt, prompt_len, cache_len) -> pstate``
* ``propose(tparams, pparams, pstate, ctx, sp, rng) -> (Proposal, pstate)``: ``n [B]`` says
  how many drafts are real (the rest is padding the verifier never accepts); stochastic
  drafts carry the draft logits ``q`` they were drawn from (``None`` for deterministic
  drafts such as n-gram lookup: the verifier then treats q as one-hot).
* ``update(pstate, ctx, n_draft, n_acc, live) -> pstate`` after the target accepted ``n_acc``
  drafts (roll a draft cache back, adapt n-gram sizes). Default: unchanged.

``TreeProposer`` (``tokax.decode.tree_speculative``): a token tree of ``n_nodes`` node slots
and depth at most ``max_depth``.

* ``init`` as above; ``propose(...) -> (Tree, pstate)``
* ``verifier()``: the tree verifier it is exact with (default ``TreeVerifier()``: greedy
  longest path, recursive rejection when sampling).
* ``verify_sizes``: static pass lengths when the valid nodes come first (``tree.valid_first``),
  so a round with a small tree gets a short pass; default ``None``, one pass over all nodes.

Both:

* ``check(target_cfg)``: raise a clear error for a target it cannot serve (another vocabulary).
* ``observe(pstate, out: VerifyOutput) -> pstate``: sees every verify pass (the block, the
  target's hidden states, the accepted count and where the newest accepted token sits;
  ``out.logits`` too when the proposer sets ``needs_logits``). Proposers that draft from
  the target's own states (blockwise / Medusa heads, lookahead) read them here, so drafting
  costs no extra target pass; Token Recycling refreshes its table of the target's top-k.
* ``can_be_empty`` (chain): a round may draft nothing (the loop then may run a one-token pass).
* ``needs_logits``: the loop scores float32 logits every round for ``observe`` (no screen).
* ``reads_target_hidden``: drafts depend on the target's states, so they cannot be replayed
  from the token history alone (``tokax.decode.replay``).
* ``extra_slots``: KV cache slots the proposer's own model needs beyond the target's (a draft's
  catch-up block), and ``context_limit()``: that model's ``max_seq_len`` (None: no model).
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
from flax import struct

from tokax.decode.sampling import SamplingParams

__all__ = ["Context", "Proposal", "ChainProposer", "TreeProposer"]


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


class _Hooks:
    kind: ClassVar[str]
    needs_logits: ClassVar[bool] = False
    reads_target_hidden: ClassVar[bool] = False
    extra_slots: ClassVar[int] = 0

    def check(self, target_cfg) -> None:
        """Raise a clear error when this proposer cannot serve ``target_cfg``; default: any target."""

    def context_limit(self) -> int | None:
        """The ``max_seq_len`` of the proposer's own model (None: it runs none)."""
        return None

    def init(self, tparams: Any, pparams: Any, prompt: jax.Array, prompt_len: jax.Array, cache_len: int) -> Any:
        raise NotImplementedError

    def observe(self, pstate: Any, out: Any) -> Any:
        """After every verify pass (``tokax.decode.loop.VerifyOutput``); default: unchanged."""
        return pstate


class ChainProposer(_Hooks):
    """Base of chain proposers (fields: at least ``k``, the most drafts per round)."""

    kind: ClassVar[str] = "chain"
    can_be_empty: ClassVar[bool] = True

    def propose(self, tparams: Any, pparams: Any, pstate: Any, ctx: Context, sp: SamplingParams,
                rng: jax.Array) -> tuple[Proposal, Any]:
        raise NotImplementedError

    def update(self, pstate: Any, ctx: Context, n_draft: jax.Array, n_acc: jax.Array, live: jax.Array) -> Any:
        """After the target accepted ``n_acc [B]`` of ``n_draft [B]`` drafts; default: unchanged."""
        return pstate


class TreeProposer(_Hooks):
    """Base of tree proposers (properties or fields ``n_nodes`` and ``max_depth``)."""

    kind: ClassVar[str] = "tree"
    verify_sizes: ClassVar[tuple[int, ...] | None] = None

    def propose(self, tparams: Any, pparams: Any, pstate: Any, ctx: Context, sp: SamplingParams, rng: jax.Array):
        raise NotImplementedError

    def verifier(self):
        from tokax.decode.tree import TreeVerifier

        return TreeVerifier()
