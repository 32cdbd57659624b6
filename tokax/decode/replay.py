"""Replay a deterministic draft against known greedy outputs, without the target.

Under greedy verification a round accepts the longest draft prefix (for a
token tree, the deepest path from the root) that matches the target's greedy
continuation, then adds the target's own next token. A proposer whose drafts
depend only on the token history (prompt lookup, ANPD, the retrieval
datastore and its tree) therefore has its rounds fixed by plain greedy's
output. ``replay_greedy`` runs such a proposer's ``propose`` / ``update`` on
the histories the speculative loop would see, and counts rounds, drafted
tokens and verify-pass lengths. Its pass count equals the loop's
(``tests/decode/test_replay.py``) and costs no target pass, so draft settings
can be compared in seconds. It gives tokens per pass only: wall-clock time
comes from a timed run (``benchmarks/speculative.py``), or is estimated from a
table of pass costs (``estimated_speedup``).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tokax.decode.proposers import Context
from tokax.decode.sampling import SamplingParams


def tree_path_length(tokens, parents, valid, ref) -> int:
    """Draft nodes accepted: the deepest path of valid nodes whose tokens are ``ref``'s prefix
    (siblings never repeat a token, so the path is unique)."""
    cur, depth = -1, 0
    while depth < len(ref):
        nxt = np.flatnonzero(valid & (parents == cur) & (tokens == ref[depth]))
        if len(nxt) == 0:
            break
        cur, depth = int(nxt[0]), depth + 1
    return depth


def default_sizes(proposer) -> tuple[int, ...]:
    """The verify-pass lengths the loop uses for ``proposer`` by default."""
    from tokax.decode.loop import verify_block_sizes

    if proposer.kind == "tree":
        sizes = proposer.verify_sizes
        return tuple(sizes) if sizes is not None else (1 + proposer.n_nodes,)
    return verify_block_sizes(proposer.k, None, proposer.can_be_empty)


def replay_greedy(proposer, pparams, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
                  sizes: Sequence[int] | None = None, cap: int = 0) -> dict:
    """Rounds of greedy speculative decoding with ``proposer`` for each prompt, given the target's
    greedy ``outputs`` (every row the same length; all rows run as one batch).

    ``sizes``: the loop's verify-pass lengths (``default_sizes``); a round at batch 1 uses the
    smallest one that holds 1 + its drafts. ``cap > 0`` keeps only each round's first ``cap``
    drafted tokens (tree nodes come valid-first with parents before children, so that is a subtree).
    Returns ``tokens_per_pass``, ``passes``, per-row ``row_passes``, ``mean_accepted_per_pass``,
    ``drafted_per_pass``, ``empty_rounds`` (share of rounds with no draft) and ``pass_lengths``
    (rounds per verify-pass length)."""
    if proposer.reads_target_hidden:
        raise ValueError(f"{type(proposer).__name__} drafts from the target's hidden states: it cannot be replayed")
    B = len(prompts)
    N = len(outputs[0])
    if B == 0 or any(len(o) != N for o in outputs):
        raise ValueError("replay_greedy: need at least one prompt and outputs of one length")
    is_tree = proposer.kind == "tree"
    sizes = tuple(sizes or default_sizes(proposer))
    K = proposer.max_depth if is_tree else proposer.k
    if cap and 1 + min(cap, proposer.n_nodes if is_tree else K) > max(sizes):
        raise ValueError(f"cap={cap} drafts do not fit the largest pass {max(sizes)}")
    S = 1 << int(np.ceil(np.log2(max(len(p) for p in prompts) + N + K + 2)))
    seq = np.zeros((B, S), np.int32)
    for b, p in enumerate(prompts):
        seq[b, :len(p)] = p
    plen = np.array([len(p) for p in prompts], np.int32)
    done = np.zeros(B, np.int32)  # new tokens so far: each comes from a round, as in the loop
    sp = SamplingParams.make(temperature=0.0)
    st = proposer.init(None, pparams, jnp.asarray(seq), jnp.asarray(plen), S)
    propose = jax.jit(lambda st, ctx: proposer.propose(None, pparams, st, ctx, sp, jax.random.PRNGKey(0)))
    update = None if is_tree else jax.jit(proposer.update)  # tree proposers keep no update
    passes, drafted, empty = (np.zeros(B, np.int64) for _ in range(3))
    pass_len: dict[int, int] = {}
    while (done < N).any():
        live = done < N
        ctx = Context(seq=jnp.asarray(seq), seq_len=jnp.asarray(plen + done), live=jnp.asarray(live))
        out, st = propose(st, ctx)
        n_acc = np.zeros(B, np.int32)
        n_draft = np.zeros(B, np.int32)
        if is_tree:
            tok, par, val = (np.array(x) for x in (out.tokens, out.parents, out.valid))
            if cap:
                val &= np.arange(val.shape[1])[None, :] < cap
        else:
            tok, n = np.asarray(out.tokens), np.asarray(out.n)
        for b in np.flatnonzero(live):
            rest = outputs[b][done[b]:]
            if is_tree:
                n_draft[b] = val[b].sum()
                a = tree_path_length(tok[b], par[b], val[b], rest)
            else:
                n_draft[b] = min(n[b], cap) if cap else n[b]
                a = 0
                while a < n_draft[b] and a < len(rest) and tok[b, a] == rest[a]:
                    a += 1
            new = min(a + 1, len(rest))
            seq[b, plen[b] + done[b]:plen[b] + done[b] + new] = rest[:new]
            done[b] += new
            n_acc[b] = a
            passes[b] += 1
            drafted[b] += n_draft[b]
            empty[b] += n_draft[b] == 0
            size = min(z for z in sizes if z >= 1 + n_draft[b])
            pass_len[size] = pass_len.get(size, 0) + 1
        if update is not None:
            st = update(st, ctx, jnp.asarray(n_draft), jnp.asarray(n_acc), jnp.asarray(live))
    total = int(passes.sum())
    return {"tokens_per_pass": N * B / total, "passes": total, "row_passes": passes.tolist(),
            "mean_accepted_per_pass": (N * B - total) / total, "drafted_per_pass": float(drafted.sum() / total),
            "empty_rounds": float(empty.sum() / total), "pass_lengths": dict(sorted(pass_len.items()))}


def estimated_speedup(result: dict, cost: dict[int, float]) -> float:
    """Decode-only speedup over plain greedy implied by ``result`` (``replay_greedy``) and
    ``cost[T]``, the time of a verify pass of T positions (``benchmarks/pass_cost.py``): plain
    greedy pays ``cost[1]`` per token. Drafting, bookkeeping and prefill are left out."""
    missing = sorted(set(result["pass_lengths"]) - set(cost))
    if missing:
        raise ValueError(f"no pass cost for lengths {missing}")
    tokens = result["tokens_per_pass"] * result["passes"]
    return tokens * cost[1] / sum(n * cost[z] for z, n in result["pass_lengths"].items())
