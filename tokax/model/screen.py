"""Exact greedy tokens from a low-precision screen of the unembedding.

Greedy verification needs only ``argmax_v h . E_v`` at each scored position,
not the logits. On CPU a float32 unembedding over Gemma's 262,144-token
vocabulary costs as much as the whole transformer body, and several
positions at once cost about twice one (a matrix-vector product becomes a
matrix product). ``screened_argmax`` gets the same argmax for about half
the cost of the multi-position float32 product:

1. approximate logits ``a_v = bf16(h) . bf16(E_v)`` (float32 accumulation);
2. a certified error bound per token (Cauchy-Schwarz, with the row norms and
   rounding errors of ``E`` precomputed once in ``ArgmaxScreen``)::

       |h . E_v - a_v| <= |h - bf16(h)| |E_v| + |bf16(h)| |E_v - bf16(E_v)|
                          + D u |bf16(h)| |bf16(E_v)|      (accumulation, u = 2^-23)

   so the true argmax is among the tokens whose upper bound ``a_v + b_v``
   reaches the floor ``max_u (a_u - b_u)``;
3. the ``n_cand`` tokens with the largest upper bounds give the floor (their
   lower bounds are lower bounds on the max); if the next upper bound is
   under it, they hold every possible winner (on Gemma 3 270M: median 1, at
   most 11 over 512 positions, ``benchmarks/screen.py``), are rescored exactly in float32, and the
   best one wins, ties to the smallest id as ``jnp.argmax``.

When the top ``n_cand`` do not certify the winner the step falls back to the full
float32 logits (``lax.cond``, all positions at once), so the result is
always the float32 argmax, up to the order of float32 summation (the same
caveat as comparing a one-token with a many-token forward).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

# Relative slack on the bound for the rounding of the bound's own arithmetic.
_SLACK = 1.001


@struct.dataclass
class ArgmaxScreen:
    embed_lo: jax.Array  # [V, D] bfloat16 copy of the unembedding
    norm: jax.Array  # [V] float32 |E_v|
    err: jax.Array  # [V] float32 |E_v - bf16(E_v)| + D u |bf16(E_v)| (rounding and accumulation)


def make_argmax_screen(embed: jax.Array) -> ArgmaxScreen:
    """The screen for an unembedding matrix ``embed [V, D]`` (float32): computed once, reused."""
    return _make(jnp.asarray(embed, jnp.float32))


@jax.jit
def _make(e):
    lo = e.astype(jnp.bfloat16)
    lo32 = lo.astype(jnp.float32)
    acc = e.shape[-1] * 2.0**-23 * jnp.linalg.norm(lo32, axis=-1)
    return ArgmaxScreen(embed_lo=lo, norm=jnp.linalg.norm(e, axis=-1),
                        err=jnp.linalg.norm(e - lo32, axis=-1) + acc)


def screened_argmax(screen: ArgmaxScreen, embed: jax.Array, hidden: jax.Array, n_cand: int = 16) -> jax.Array:
    """``argmax(hidden @ embed.T, -1)`` for ``hidden [..., D]``, exactly, via the screen.

    ``embed [V, D]`` is the float32 unembedding the screen was made from."""
    lead = hidden.shape[:-1]
    V, D = embed.shape
    n_cand = min(n_cand, V - 1)  # a small vocabulary: every token is a candidate
    if n_cand < 1:
        return jnp.zeros(lead, jnp.int32)
    h = hidden.reshape(-1, D).astype(jnp.float32)  # [N, D]
    N = h.shape[0]
    h_lo = h.astype(jnp.bfloat16)
    h_lo32 = h_lo.astype(jnp.float32)
    dh = _SLACK * jnp.linalg.norm(h - h_lo32, axis=-1)[:, None]  # [N, 1]
    nh = _SLACK * jnp.linalg.norm(h_lo32, axis=-1)[:, None]
    # A one-row bf16 product takes a slow matrix-vector path on CPU; two rows take the fast one.
    a = jnp.einsum("nd,vd->nv", jnp.pad(h_lo, ((0, max(0, 2 - N)), (0, 0))), screen.embed_lo,
                   preferred_element_type=jnp.float32)
    # Keep the product a plain matmul: fusing the bound into it takes a much slower CPU path.
    a = jax.lax.optimization_barrier(a)[:N]  # [N, V]
    upper = a + dh * screen.norm[None] + nh * screen.err[None]
    # (The barrier keeps XLA CPU's fast top-k: fusing its outputs' uses turns it into a full sort.)
    ub, cand = jax.lax.optimization_barrier(jax.lax.top_k(upper, n_cand + 1))  # [N, C+1]
    ub, nxt, cand = ub[:, :n_cand], ub[:, n_cand], cand[:, :n_cand]
    # Every candidate's lower bound a - (ub - a) is a lower bound on the true max; the best of them
    # is the floor. (Gathering the bound from ``a``: gathering the row norms at ``cand`` here
    # fuses into a pathologically slow CPU loop.)
    a_c = jnp.take_along_axis(a, cand, axis=1)
    floor = jnp.max(a_c - (ub - a_c), axis=-1)  # [N]
    # Tokens outside the top C have upper bounds <= nxt: if nxt < floor none of them can win.

    def rescored(_):
        exact = jnp.einsum("nd,ncd->nc", h, jnp.take(embed, cand, axis=0))
        exact = jnp.where(ub >= floor[:, None], exact, -jnp.inf)
        best = jnp.max(exact, axis=-1, keepdims=True)
        return jnp.min(jnp.where(exact == best, cand, V), axis=-1).astype(jnp.int32)

    def full(_):
        return jnp.argmax(jnp.einsum("nd,vd->nv", h, embed), axis=-1).astype(jnp.int32)

    top = jax.lax.cond(jnp.all(nxt < floor), rescored, full, None)
    return top.reshape(lead)


def greedy_tokens(cfg, params, hidden: jax.Array, screen: ArgmaxScreen | None) -> jax.Array:
    """The target's greedy token at every position of ``hidden [B, T, D]`` -> ``[B, T]``.

    Without a screen, the float32 logits' argmax; else ``screened_argmax``, at one position
    too (padded to two rows it reads half the bytes of the float32 matrix-vector product:
    13.4 against 15.1 ms on 2 cores, ``benchmarks/screen.py``), as plain greedy decoding does."""
    from tokax.model.decoder import unembed

    if screen is None:
        return jnp.argmax(unembed(cfg, params, hidden), axis=-1).astype(jnp.int32)
    return screened_argmax(screen, params["embed"], hidden)


def screen_for(params, enabled) -> ArgmaxScreen | None:
    """``enabled``: False/None (no screen), True (build one from ``params["embed"]``), or a screen."""
    if enabled is None or enabled is False:
        return None
    if isinstance(enabled, ArgmaxScreen):
        return enabled
    if enabled is not True:
        raise ValueError(f"greedy_screen={enabled!r}: use True, False or an ArgmaxScreen")
    embed = params["embed"]
    if embed.dtype != jnp.float32:
        raise ValueError(f"greedy_screen needs float32 params (the screen is a bfloat16 copy); got {embed.dtype}")
    return make_argmax_screen(embed)
