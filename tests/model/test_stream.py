"""Stream (a model + the KV cache of its rows) against fresh prefills: rows gathered by index
(forks and reorders, for beams) continue exactly as a new stream that read the same rows'
tokens; a read-only pass plus ``commit`` equals a writing pass; ``rollback`` forgets the
dropped tokens; a subset head gives the full head's logits on its tokens."""

import jax.numpy as jnp
import numpy as np

from tokax.model import config as mc
from tokax.model.heads import NEG_LOGIT, subset_head_params
from tokax.model.stream import Stream
from tokax.testing import random_params

V = 40


def setup():
    cfg = mc.tiny(vocab_size=V)
    params = random_params(cfg, seed=4)
    rs = np.random.RandomState(0)
    lens = np.array([5, 11, 8], np.int32)
    prompt = rs.randint(0, V, size=(3, 12)).astype(np.int32)
    return cfg, params, prompt, lens


def fresh_logits(cfg, params, seqs):
    """Logits after the last token of each sequence, from a new stream per batch (one prefill)."""
    L = max(len(x) for x in seqs)
    arr = np.zeros((len(seqs), L), np.int32)
    for i, x in enumerate(seqs):
        arr[i, : len(x)] = x
    lens = jnp.asarray([len(x) for x in seqs])
    s = Stream.empty(cfg, params, len(seqs), L).prefill(jnp.asarray(arr[:, :-1]), lens - 1)
    last = jnp.asarray([[x[-1]] for x in seqs])
    logits, _, _ = s.extend(last, (lens - 1)[:, None])
    return np.asarray(logits[:, 0])


def test_take_rows_forks_and_reorders_rows():
    cfg, params, prompt, lens = setup()
    s = Stream.empty(cfg, params, 3, 24).prefill(jnp.asarray(prompt), jnp.asarray(lens))
    idx = np.array([2, 0, 0, 1])  # row 0 forked two ways, the others reordered
    forked = s.take_rows(jnp.asarray(idx))
    assert forked.cache.batch == 4
    np.testing.assert_array_equal(np.asarray(forked.cache.pos), np.asarray(s.cache.pos)[idx])
    nxt = np.array([[3], [7], [9], [1]], np.int32)  # each fork continues differently
    logits, _, _ = forked.extend(jnp.asarray(nxt), jnp.asarray(lens[idx])[:, None])
    want = fresh_logits(cfg, params, [prompt[r, : lens[r]].tolist() + [int(t)] for r, t in zip(idx, nxt[:, 0])])
    np.testing.assert_allclose(np.asarray(logits[:, 0]), want, rtol=2e-5, atol=2e-5)


def test_score_then_commit_equals_extend_and_rollback_forgets():
    cfg, params, prompt, lens = setup()
    s = Stream.empty(cfg, params, 3, 24).prefill(jnp.asarray(prompt), jnp.asarray(lens))
    block = jnp.asarray([[4, 5, 6]] * 3)
    pos = jnp.asarray(lens)[:, None] + jnp.arange(3)[None]
    lg_w, _, written = s.extend(block, pos)
    lg_r, _, blk = s.score(block, pos)
    committed = s.commit(blk)
    np.testing.assert_allclose(np.asarray(lg_r), np.asarray(lg_w), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(committed.cache.pos), np.asarray(written.cache.pos))
    np.testing.assert_array_equal(np.asarray(committed.length), np.asarray(written.length))
    for a, b in zip(committed.cache.k + committed.cache.v, written.cache.k + written.cache.v):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)  # float order only
    # Keep one of the three block tokens: the next token sees prompt + that token only.
    kept = committed.rollback(s.length + 1)  # slots, not positions: the block starts at the old length
    logits, _, _ = kept.extend(jnp.asarray([[8]] * 3), jnp.asarray(lens)[:, None] + 1)
    want = fresh_logits(cfg, params, [prompt[r, : lens[r]].tolist() + [4, 8] for r in range(3)])
    np.testing.assert_allclose(np.asarray(logits[:, 0]), want, rtol=2e-5, atol=2e-5)


def test_subset_head_is_the_full_head_on_its_tokens():
    cfg, params, prompt, lens = setup()
    ids = np.array([1, 4, 9, 30])
    full, _, _ = Stream.empty(cfg, params, 3, 24).extend(jnp.asarray(prompt), jnp.asarray(
        np.where(np.arange(12)[None] < lens[:, None], np.arange(12)[None], -1)))
    sub, _, _ = Stream.empty(cfg, subset_head_params(params, ids), 3, 24).extend(jnp.asarray(prompt), jnp.asarray(
        np.where(np.arange(12)[None] < lens[:, None], np.arange(12)[None], -1)))
    full, sub = np.asarray(full), np.asarray(sub)
    np.testing.assert_allclose(sub[..., ids], full[..., ids], rtol=1e-5, atol=1e-5)
    outside = np.setdiff1d(np.arange(V), ids)
    assert (sub[..., outside] == NEG_LOGIT).all()
