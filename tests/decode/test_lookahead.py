"""Lookahead decoding: the n-gram pool and the Jacobi bookkeeping against plain Python
references (its losslessness is ``tests/decode/test_lossless.py``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokax.decode.loop import VerifyOutput
from tokax.decode.proposers.lookahead import LookaheadProposer, _insert_row, _lookup_row

K = 3


def test_pool_against_python_reference():
    P, G, N = 4, 2, 3
    rs = np.random.RandomState(0)
    keys = jnp.full((P, G), -1, jnp.int32)
    vals = jnp.zeros((P, G, N - 1), jnp.int32)
    ptr = jnp.zeros((P,), jnp.int32)
    lookup = jax.jit(_lookup_row)
    ref = {b: [] for b in range(P)}  # bucket -> list of (key, cont), oldest first, at most G
    for _ in range(6):
        grams = rs.randint(0, 6, size=(5, N)).astype(np.int32)
        grams[3] = grams[1]  # a duplicate within one insertion call
        ok = rs.rand(5) < 0.8
        keys, vals, ptr = jax.jit(_insert_row)(keys, vals, ptr, jnp.asarray(grams), jnp.asarray(ok))
        for g, o in zip(grams, ok):
            item = (int(g[0]), tuple(int(x) for x in g[1:]))
            bkt = ref[item[0] % P]
            if o and item not in bkt:
                bkt.append(item)
                del bkt[:-G]
        for key in range(7):
            cont, hit = lookup(keys, vals, ptr, jnp.int32(key))
            newest = [c for kk, c in ref[key % P] if kk == key]
            assert bool(hit) == bool(newest), key
            if newest:
                assert tuple(np.asarray(cont).tolist()) == newest[-1]


def test_jacobi_shift_and_diagonal_ngrams():
    """One pass's bookkeeping: pooled n-grams are (trail_i, x_i, y_i), the next
    window is y shifted past the accepted drafts, trails gain the input that
    produced each guess (Python reference)."""
    Kp, N, V = 4, 3, 12
    prop = LookaheadProposer(k=Kp, ngram=N, pool_buckets=64, pool_slots=4)
    rs = np.random.RandomState(1)
    Bt = 3
    embed = jnp.eye(V, 16, dtype=jnp.float32)  # hidden = 5 * e_y  ->  argmax = y
    st = prop.init({"embed": embed}, None, jnp.zeros((Bt, 4), jnp.int32), jnp.full((Bt,), 4), 16)
    block = rs.randint(0, V, size=(Bt, Kp + 1)).astype(np.int32)
    trail = rs.randint(0, V, size=(Bt, Kp + 1, N - 2)).astype(np.int32)
    trail[0, 2] = -1  # an unknown predecessor: no n-gram from that position
    y = rs.randint(0, V, size=(Bt, Kp + 1))
    hidden = 5.0 * np.eye(16)[y]
    n_acc = np.array([0, 2, Kp])
    st = st.replace(block=jnp.asarray(block), trail=jnp.asarray(trail))
    hidden, n_acc_j, live = jnp.asarray(hidden, jnp.float32), jnp.asarray(n_acc), jnp.ones((Bt,), bool)
    st = prop.observe(st, VerifyOutput(block=jnp.asarray(block), positions=jnp.zeros((Bt, Kp + 1), jnp.int32),
                                       hidden=hidden, n_acc=n_acc_j, accepted_at=n_acc_j, live=live))
    st2, win, wtrail = jax.jit(prop.jacobi)({"embed": embed}, st)
    win, wtrail = np.asarray(win), np.asarray(wtrail)
    for b in range(Bt):
        a = n_acc[b]
        for j in range(Kp + 1):
            src = a + j
            want_tok = y[b, src] if src <= Kp else y[b, Kp]
            want_trail = list(trail[b, src][1:]) + [block[b, src]] if src <= Kp else [-1] * (N - 2)
            if j > 0:
                assert win[b, j - 1] == want_tok
            assert wtrail[b, j].tolist() == want_trail
        for i in range(Kp + 1):
            cont, hit = _lookup_row(st2.keys[b], st2.vals[b], st2.ptr[b], jnp.int32(trail[b, i, 0]))
            if trail[b, i, 0] < 0:
                continue
            # Some n-gram with this key is pooled (a later one with the same key may be newer).
            grams = [(trail[b, m, 0], block[b, m], y[b, m]) for m in range(Kp + 1) if trail[b, m, 0] >= 0]
            assert bool(hit) and tuple([trail[b, i, 0]] + np.asarray(cont).tolist()) in grams


def test_bad_sizes():
    with pytest.raises(ValueError, match="ngram=6"):
        LookaheadProposer(k=4, ngram=6)
