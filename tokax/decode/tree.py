"""Static-shape token trees and their lossless verification (SpecInfer;
Miao et al. 2024; SpecTr; Sun et al. 2023).

A tree of ``N`` draft nodes hangs below the root, the newest accepted token
``last`` (position ``t``). Node ``i`` has a parent ``parents[b, i]`` that is
either ``-1`` (the root) or a node ``j < i`` (topological order), so one scan
over node indices visits every parent before its children. Siblings are
ordered by index: that is the order in which they were drawn and in which the
verifier tries them. Node ``i`` sits at position ``t + depth[i]`` and the
target scores ``[last, node_0 .. node_{N-1}]`` in one pass where each token
sees the cache, the root, and its ancestors-or-self (``block_mask``):

    M[0, 0] = 1,   M[1 + i, 0] = 1,   M[1 + i, 1 + j] = [j is an ancestor-or-self of i].

Verifiers take the target logits of that pass, ``p_logits [B, 1+N, V]``
(row 0 predicts a child of the root, row ``1+i`` a child of node ``i``):

* greedy: follow, from the root, the first child whose token equals the
  target argmax; the next token is the argmax at the last accepted node
  (output identical to plain greedy decoding).
* recursive rejection (SpecInfer's multi-step speculative sampling): at the
  current node with target ``r = p(. | path)``, try its children ``c_1, c_2,
  ..`` in order, child ``c_j`` drawn from ``q_j`` (the draft distribution
  given the earlier siblings: ``q`` itself for i.i.d. draws, ``q`` with the
  earlier siblings removed for draws without replacement, one-hot for
  deterministic children):

      accept c_j with probability min(1, r(c_j) / q_j(c_j));
      on rejection r <- norm(max(0, r - q_j)) and try c_{j+1};
      if every child is rejected, the next token ~ r (the residual);
      after an acceptance, descend with r = p(. | path, c_j).

  Each step is one speculative-sampling step against the current residual,
  so the emitted token is distributed exactly as ``p``.
* SpecTr's k-sequential selection (``spectr_verify``) for ``k`` i.i.d. draft
  chains: at depth d the ``m`` chains whose prefix equals the accepted one
  hold i.i.d. draws ``X_1..X_m ~ q``; with

      beta(rho) = sum_x min(q(x), p(x) / rho),

  and ``rho`` in ``[1, m]`` the smallest value with
  ``1 - (1 - beta)^m <= rho * beta`` (bisection), accept the first ``X_i``
  for which ``u_i < p(X_i) / (rho q(X_i))``; if none passes, draw from

      p_res(x) ∝ p(x) - min(q(x), p(x) / rho) * (1 - (1 - beta)^m) / beta,

  which is non-negative by the choice of rho and makes the output exactly
  ``p`` (the probability that draft i is the first accepted and equals x
  is ``(1 - beta)^(i-1) min(q(x), p(x)/rho)``).

Sampling processors (temperature, top-k, top-p, min-p) are applied to the
target logits here and to the draft logits by the proposer, as in
``tokax.decode.verify``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from tokax.decode.sampling import SamplingParams, process_logits
from tokax.decode.verify import AT_ZERO_TEMPERATURE
from tokax.model import kv_cache as kvc


@struct.dataclass
class Tree:
    """A batch of draft trees with ``N`` node slots each."""

    tokens: jax.Array  # [B, N] int32 node tokens
    parents: jax.Array  # [B, N] int32 parent node index, -1 = the root (last accepted token)
    valid: jax.Array  # [B, N] bool, nodes that exist (an invalid node's descendants must be invalid too)
    # [B, N, V] processed draft distribution node i was drawn from, given its
    # earlier siblings; None for deterministic trees (q is then one-hot on the node).
    q_probs: jax.Array | None = None

    @property
    def n_nodes(self) -> int:
        return self.tokens.shape[1]


def tree_depth(parents: jax.Array) -> jax.Array:
    """Depth of each node (children of the root have depth 1): ``[B, N]`` -> ``[B, N]`` int32.

    One scan in index order suffices because parents precede their children."""
    B, N = parents.shape

    def body(i, depth):
        par = parents[:, i]
        d_par = jnp.take_along_axis(depth, jnp.maximum(par, 0)[:, None], axis=1)[:, 0]
        return depth.at[:, i].set(jnp.where(par < 0, 1, d_par + 1))

    return jax.lax.fori_loop(0, N, body, jnp.zeros((B, N), jnp.int32))


def ancestor_mask(parents: jax.Array) -> jax.Array:
    """``anc[b, i, j]`` = node j is an ancestor of node i or i itself: ``[B, N]`` -> ``[B, N, N]`` bool."""
    B, N = parents.shape
    eye = jnp.eye(N, dtype=bool)

    def body(i, anc):
        par = parents[:, i]
        row_par = jnp.take_along_axis(anc, jnp.maximum(par, 0)[:, None, None], axis=1)[:, 0]  # [B, N]
        row = eye[i][None, :] | (row_par & (par >= 0)[:, None])
        return anc.at[:, i].set(row)

    return jax.lax.fori_loop(0, N, body, jnp.zeros((B, N, N), bool))


def block_mask(parents: jax.Array) -> jax.Array:
    """Visibility among ``[root, node_0 .. node_{N-1}]`` for one target pass:
    ``[B, N]`` -> ``[B, 1+N, 1+N]`` bool (every token sees the root; a node
    sees its ancestors and itself; the root sees only itself)."""
    B, N = parents.shape
    anc = ancestor_mask(parents)
    top = jnp.concatenate([jnp.ones((B, 1, 1), bool), jnp.zeros((B, 1, N), bool)], axis=2)
    rest = jnp.concatenate([jnp.ones((B, N, 1), bool), anc], axis=2)
    return jnp.concatenate([top, rest], axis=1)


def block_positions(tree: Tree, root_pos: jax.Array, live: jax.Array) -> jax.Array:
    """Position ids of ``[root, nodes]``: ``root_pos + depth``; -1 for invalid
    nodes and for rows that are not live. ``[B, 1+N]`` int32."""
    depth = tree_depth(tree.parents)
    pos = jnp.concatenate([root_pos[:, None], root_pos[:, None] + depth], axis=1)
    ok = jnp.concatenate([jnp.ones_like(tree.valid[:, :1]), tree.valid], axis=1) & live[:, None]
    return jnp.where(ok, pos, -1).astype(jnp.int32)


def valid_first(tree: Tree) -> Tree:
    """The same tree with its valid nodes moved to the front, keeping their order (so parents
    still precede children and siblings keep the order the verifiers try them in). With the
    valid nodes first, a verify pass over the first ``1 + n_valid`` block tokens scores them all
    (``tree_step``'s ``verify_sizes``)."""
    B, N = tree.tokens.shape
    perm = jnp.argsort(~tree.valid, axis=1, stable=True).astype(jnp.int32)  # new index -> old index
    inv = jnp.argsort(perm, axis=1).astype(jnp.int32)  # old index -> new index
    par = jnp.take_along_axis(tree.parents, perm, axis=1)
    par = jnp.where(par >= 0, jnp.take_along_axis(inv, jnp.maximum(par, 0), axis=1), -1)
    take = lambda x: jnp.take_along_axis(x, perm.reshape(perm.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731
    return Tree(tokens=take(tree.tokens), parents=par, valid=take(tree.valid),
                q_probs=None if tree.q_probs is None else take(tree.q_probs))


def compact_to_path(cache: kvc.KVCache, start: jax.Array, path: jax.Array, n_acc: jax.Array,
                    live: jax.Array) -> kvc.KVCache:
    """Keep the root and the accepted nodes of a tree block written at slot
    ``start``: ``path [B, D]`` holds accepted node indices (root first), so the
    kept block offsets are ``[0, 1 + path[0], .., 1 + path[n_acc - 1]]``.
    Rows that are not live keep nothing of the block."""
    keep = jnp.concatenate([jnp.zeros_like(path[:, :1]), 1 + jnp.maximum(path, 0)], axis=1)
    n_keep = jnp.where(live, 1 + n_acc, 0)
    return kvc.compact(cache, start, keep, n_keep)


def _row(x: jax.Array, i: jax.Array) -> jax.Array:
    """``x[b, i[b]]`` for ``x [B, T, ...]``."""
    idx = i.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.take_along_axis(x, idx, axis=1)[:, 0]


def node_q(tree: Tree, i: int | jax.Array, V: int) -> jax.Array:
    """The distribution node ``i`` was drawn from: ``[B, V]``."""
    if tree.q_probs is None:
        return jax.nn.one_hot(tree.tokens[:, i], V, dtype=jnp.float32)
    return tree.q_probs[:, i]


def greedy_tree_verify(p_logits: jax.Array, tree: Tree, max_depth: int):
    """Longest root path whose tokens equal the target argmax.

    Returns ``n_acc [B]``, ``path [B, max_depth]`` (accepted node indices,
    -1 past ``n_acc``) and the next token ``[B]`` (argmax after the path)."""
    return greedy_tree_accept(jnp.argmax(p_logits, axis=-1).astype(jnp.int32), tree, max_depth)


def greedy_tree_accept(top: jax.Array, tree: Tree, max_depth: int):
    """``greedy_tree_verify`` from the target's greedy tokens ``top [B, 1+N]``."""
    B, N = tree.tokens.shape

    def body(i, c):
        cur, n_acc, path = c
        ok = tree.valid[:, i] & (tree.parents[:, i] + 1 == cur) & (tree.tokens[:, i] == _row(top, cur))
        path = jnp.where(ok[:, None] & (jnp.arange(max_depth)[None] == n_acc[:, None]), i, path)
        return jnp.where(ok, i + 1, cur), n_acc + ok, path

    zeros = jnp.zeros((B,), jnp.int32)
    cur, n_acc, path = jax.lax.fori_loop(0, N, body, (zeros, zeros, jnp.full((B, max_depth), -1, jnp.int32)))
    return n_acc, path, _row(top, cur)


def _normalize(r: jax.Array, fallback: jax.Array) -> jax.Array:
    """r / sum(r); in exact arithmetic a rejection leaves mass > 0, the guard is for round-off."""
    mass = r.sum(-1, keepdims=True)
    return jnp.where(mass > 1e-12, r / jnp.where(mass > 0, mass, 1.0), fallback)


def sampling_tree_verify(p_logits: jax.Array, tree: Tree, sp: SamplingParams, rng: jax.Array, max_depth: int,
                         update_residual: bool = True):
    """Recursive rejection sampling over the tree (see the module docstring).

    ``update_residual=False`` is a deliberately WRONG rule (siblings are tested
    against the unchanged target), kept for the tests' negative control."""
    B, N = tree.tokens.shape
    V = p_logits.shape[-1]
    k_acc, k_next = jax.random.split(rng)
    p = jax.nn.softmax(process_logits(p_logits, sp), axis=-1)  # [B, 1+N, V]
    u = jax.random.uniform(k_acc, (B, N))

    def body(i, c):
        cur, n_acc, path, r = c
        tok = tree.tokens[:, i]
        q = node_q(tree, i, V)  # [B, V]
        child = tree.valid[:, i] & (tree.parents[:, i] + 1 == cur)
        rx = jnp.take_along_axis(r, tok[:, None], axis=1)[:, 0]
        qx = jnp.take_along_axis(q, tok[:, None], axis=1)[:, 0]
        ok = child & (u[:, i] * qx < rx)  # u < r/q without dividing
        rej = child & ~ok
        if update_residual:
            r_rej = _normalize(jnp.maximum(r - q, 0.0), r)
        else:
            r_rej = r
        r = jnp.where(ok[:, None], p[:, i + 1], jnp.where(rej[:, None], r_rej, r))
        path = jnp.where(ok[:, None] & (jnp.arange(max_depth)[None] == n_acc[:, None]), i, path)
        return jnp.where(ok, i + 1, cur), n_acc + ok, path, r

    zeros = jnp.zeros((B,), jnp.int32)
    init = (zeros, zeros, jnp.full((B, max_depth), -1, jnp.int32), p[:, 0])
    cur, n_acc, path, r = jax.lax.fori_loop(0, N, body, init)
    nxt = jax.random.categorical(k_next, jnp.log(r), axis=-1).astype(jnp.int32)
    return n_acc, path, nxt


def spectr_rho(p: jax.Array, q: jax.Array, m: jax.Array, iters: int = 40) -> jax.Array:
    """Smallest ``rho`` in ``[1, m]`` with ``1 - (1 - beta(rho))^m <= rho * beta(rho)``
    (by bisection; the left side minus the right decreases in rho, equality at
    rho = 1 for m = 1). ``p, q [B, V]``, ``m [B]`` -> ``[B]``; returns the
    upper end of the final bracket, which always satisfies the condition."""
    m = jnp.maximum(m, 1).astype(jnp.float32)

    def ok(rho):
        beta = jnp.minimum(q, p / rho[:, None]).sum(-1)
        return 1.0 - (1.0 - beta) ** m <= rho * beta * (1.0 + 1e-6)

    def body(_, c):
        lo, hi = c
        mid = 0.5 * (lo + hi)
        good = ok(mid)
        return jnp.where(good, lo, mid), jnp.where(good, mid, hi)

    lo = jnp.ones_like(m)
    lo, hi = jax.lax.fori_loop(0, iters, body, (lo, m))
    return jnp.where(ok(lo), lo, hi)  # m == 1: rho = 1 exactly


def kseq_residual(p: jax.Array, q: jax.Array, rho: jax.Array, m: jax.Array) -> jax.Array:
    """SpecTr's residual after all ``m`` drafts were rejected (normalized), ``[B, V]``."""
    mn = jnp.minimum(q, p / rho[:, None])
    beta = mn.sum(-1, keepdims=True)
    mf = jnp.maximum(m, 1).astype(jnp.float32)[:, None]
    scale = jnp.where(beta > 1e-12, (1.0 - (1.0 - beta) ** mf) / jnp.where(beta > 1e-12, beta, 1.0), mf)
    return _normalize(jnp.maximum(p - mn * scale, 0.0), p)


@dataclasses.dataclass(frozen=True)
class SpecTrVerifier:
    """k-sequential draft selection (SpecTr, Sun et al. 2023) over ``k``
    i.i.d. draft chains of length ``L``, laid out depth-major: node
    ``d * k + j`` is chain j's token at depth d + 1, its parent node
    ``(d - 1) * k + j`` (the root for d = 0). Greedy decoding uses
    ``greedy_tree_verify``. ``fixed_rho`` replaces the computed rho (rho = 1
    for k > 1 is a deliberately WRONG rule, for the tests' negative control)."""

    k: int
    length: int
    fixed_rho: float | None = None
    greedy_path = AT_ZERO_TEMPERATURE  # greedy_tree_verify at temperature 0 (not a field)

    def __call__(self, p_logits, tree: Tree, sp: SamplingParams, rng, max_depth: int):
        return jax.lax.cond(
            sp.temperature <= 0.0,
            lambda: greedy_tree_verify(p_logits, tree, max_depth),
            lambda: self.sample(p_logits, tree, sp, rng, max_depth),
        )

    def sample(self, p_logits, tree: Tree, sp: SamplingParams, rng, max_depth: int):
        k, L = self.k, self.length
        B, N = tree.tokens.shape
        if N != k * L:
            raise ValueError(f"SpecTr tree has {N} nodes, expected k * length = {k} * {L}")
        if tree.q_probs is None:
            raise ValueError("SpecTr verification needs the draft distributions (tree.q_probs) of i.i.d. drafts")
        k_acc, k_next = jax.random.split(rng)
        p_all = jax.nn.softmax(process_logits(p_logits, sp), axis=-1)  # [B, 1+N, V]
        u = jax.random.uniform(k_acc, (B, L, k))
        active = jnp.ones((B, k), bool) & tree.valid[:, :k]  # chains whose prefix equals the accepted one
        going = jnp.ones((B,), bool)  # every depth so far accepted a draft
        cur = jnp.zeros((B,), jnp.int32)  # block index of the last accepted node (0 = root)
        n_acc = jnp.zeros((B,), jnp.int32)
        path = jnp.full((B, max_depth), -1, jnp.int32)
        r = p_all[:, 0]  # target at the current node; the residual once a depth rejects all
        for d in range(L):
            toks = tree.tokens[:, d * k:(d + 1) * k]  # [B, k]
            active = active & tree.valid[:, d * k:(d + 1) * k] & going[:, None]
            m = active.sum(1)
            first = jnp.argmax(active, axis=1)  # the chains agree up to here: any active one gives q
            q = _row(tree.q_probs, d * k + first)  # [B, V]
            p = r
            rho = spectr_rho(p, q, m) if self.fixed_rho is None else jnp.full((B,), self.fixed_rho, jnp.float32)
            px = jnp.take_along_axis(p, toks, axis=1)  # [B, k]
            qx = jnp.take_along_axis(q, toks, axis=1)
            ok = active & (u[:, d] * rho[:, None] * qx < px)
            hit = ok.any(1)
            j = jnp.argmax(ok, axis=1)  # the first chain that passes
            y = jnp.take_along_axis(toks, j[:, None], axis=1)[:, 0]
            node = d * k + j
            path = path.at[:, d].set(jnp.where(hit & (m > 0), node, path[:, d]))
            acc = hit & (m > 0)
            n_acc = n_acc + acc
            res = kseq_residual(p, q, rho, m)
            r = jnp.where(acc[:, None], _row(p_all, 1 + node), jnp.where((m > 0)[:, None], res, r))
            cur = jnp.where(acc, 1 + node, cur)
            going = going & acc
            active = active & (toks == y[:, None])
        nxt = jax.random.categorical(k_next, jnp.log(r), axis=-1).astype(jnp.int32)
        return n_acc, path, nxt


@dataclasses.dataclass(frozen=True)
class TreeVerifier:
    """Greedy tree verification when ``sp.temperature == 0``, recursive
    rejection sampling otherwise. ``update_residual=False`` is the WRONG rule
    used as a negative control in tests."""

    update_residual: bool = True
    greedy_path = AT_ZERO_TEMPERATURE  # greedy_tree_verify at temperature 0 (not a field)

    def __call__(self, p_logits, tree: Tree, sp: SamplingParams, rng, max_depth: int):
        return jax.lax.cond(
            sp.temperature <= 0.0,
            lambda: greedy_tree_verify(p_logits, tree, max_depth),
            lambda: sampling_tree_verify(p_logits, tree, sp, rng, max_depth, self.update_residual),
        )
