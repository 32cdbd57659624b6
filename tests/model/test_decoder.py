"""Decoder and KV cache against the independent numpy oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.model import numpy_reference
from tokax.model import config as mc
from tokax.model import kv_cache as kvc
from tokax.model.decoder import forward_jit as forward
from tokax.testing import random_params


def full_logits(cfg, params, tokens):
    T = len(tokens)
    cache = kvc.init_cache(cfg, 1, T)
    lg, _, _ = forward(cfg, params, jnp.asarray([tokens]), jnp.arange(T)[None], cache)
    return np.asarray(lg[0])


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def tiny():
    cfg = mc.tiny(vocab_size=97)
    return cfg, random_params(cfg)


def test_full_forward_matches_numpy_oracle(tiny):
    cfg, params = tiny
    toks = np.random.RandomState(0).randint(0, cfg.vocab_size, size=24).tolist()  # 3x the window
    ref = numpy_reference.forward(cfg, params, toks)
    assert rel_err(full_logits(cfg, params, toks), ref) < 1e-5


def test_sliding_window_past_512_tokens():
    # Gemma's real window (512) with a tiny width: 600 tokens, one local and one global layer.
    cfg = mc.tiny(vocab_size=61, sliding_window=512, d_model=16, n_heads=2, n_kv_heads=1, head_dim=8, ffn_dim=32)
    params = random_params(cfg, seed=3)
    toks = np.random.RandomState(1).randint(0, cfg.vocab_size, size=600).tolist()
    ref = numpy_reference.forward(cfg, params, toks)
    # Prefill 500 tokens, then decode the remaining 100 one at a time through the cache.
    cache = kvc.init_cache(cfg, 1, 600)
    step = lambda p, t, pos, c: forward(cfg, p, t, pos, c)  # noqa: E731
    lg, _, cache = step(params, jnp.asarray([toks[:500]]), jnp.arange(500)[None], cache)
    got = [np.asarray(lg[0])]
    for t in range(500, 600):
        lg, _, cache = step(params, jnp.asarray([[toks[t]]]), jnp.asarray([[t]]), cache)
        got.append(np.asarray(lg[0]))
    got = np.concatenate(got)
    assert rel_err(got, ref) < 1e-4
    # The window really matters here: a model without it differs.
    no_window = numpy_reference.forward(cfg.replace(sliding_window=None), params, toks)
    assert rel_err(no_window[-50:], ref[-50:]) > 1e-3


def test_multi_position_writes_match_full_forward(tiny):
    cfg, params = tiny
    toks = np.random.RandomState(2).randint(0, cfg.vocab_size, size=20).tolist()
    ref = full_logits(cfg, params, toks)
    cache = kvc.init_cache(cfg, 1, 32)
    got = []
    for a, b in [(0, 7), (7, 10), (10, 11), (11, 20)]:  # chunks of 7, 3, 1, 9 positions
        lg, _, cache = forward(cfg, params, jnp.asarray([toks[a:b]]), jnp.arange(a, b)[None], cache)
        got.append(np.asarray(lg[0]))
    assert int(cache.length[0]) == 20
    np.testing.assert_allclose(np.concatenate(got), ref, rtol=1e-5, atol=1e-5)


def test_rollback_then_continue_equals_accepted_chain(tiny):
    cfg, params = tiny
    rs = np.random.RandomState(3)
    prefix = rs.randint(0, cfg.vocab_size, size=9).tolist()
    draft = rs.randint(0, cfg.vocab_size, size=4).tolist()
    nxt = rs.randint(0, cfg.vocab_size)
    cache = kvc.init_cache(cfg, 1, 32)
    _, _, cache = forward(cfg, params, jnp.asarray([prefix]), jnp.arange(9)[None], cache)
    _, _, cache = forward(cfg, params, jnp.asarray([draft]), jnp.arange(9, 13)[None], cache)
    cache = kvc.rollback(cache, jnp.asarray([11]))  # keep two drafts
    lg, _, _ = forward(cfg, params, jnp.asarray([[nxt]]), jnp.asarray([[11]]), cache)
    ref = full_logits(cfg, params, prefix + draft[:2] + [nxt])[-1]
    np.testing.assert_allclose(np.asarray(lg[0, 0]), ref, rtol=1e-5, atol=1e-5)


def test_tree_block_mask_and_compaction(tiny):
    """Write a 5-node token tree in one pass, keep one root-to-leaf path, continue."""
    cfg, params = tiny
    rs = np.random.RandomState(4)
    prefix = rs.randint(0, cfg.vocab_size, size=6).tolist()
    # tree: 0 -> {1, 2}; 1 -> {3}; 2 -> {4}. Depths 0,1,1,2,2.
    parent = [-1, 0, 0, 1, 2]
    depth = np.array([0, 1, 1, 2, 2])
    anc = np.zeros((5, 5), bool)
    for i in range(5):
        j = i
        while j >= 0:
            anc[i, j] = True
            j = parent[j]
    nodes = rs.randint(0, cfg.vocab_size, size=5).tolist()
    cache = kvc.init_cache(cfg, 1, 32)
    _, _, cache = forward(cfg, params, jnp.asarray([prefix]), jnp.arange(6)[None], cache)
    lg, _, cache = forward(
        cfg, params, jnp.asarray([nodes]), jnp.asarray([6 + depth]), cache, block_mask=jnp.asarray(anc[None])
    )
    # Each node's logits equal the chain of its own path scored alone.
    for i in range(5):
        path = [j for j in range(5) if anc[i, j]]
        ref = full_logits(cfg, params, prefix + [nodes[j] for j in path])[-1]
        np.testing.assert_allclose(np.asarray(lg[0, i]), ref, rtol=1e-5, atol=1e-5)
    # Keep path 0 -> 2 -> 4, then one more token.
    cache = kvc.compact(cache, jnp.asarray([6]), jnp.asarray([[0, 2, 4, 0, 0]]), jnp.asarray([3]))
    assert int(cache.length[0]) == 9
    nxt = 5
    lg, _, _ = forward(cfg, params, jnp.asarray([[nxt]]), jnp.asarray([[9]]), cache)
    ref = full_logits(cfg, params, prefix + [nodes[0], nodes[2], nodes[4], nxt])[-1]
    np.testing.assert_allclose(np.asarray(lg[0, 0]), ref, rtol=1e-5, atol=1e-5)


def test_compact_is_per_row(tiny):
    cfg, params = tiny
    rs = np.random.RandomState(5)
    rows = [rs.randint(0, cfg.vocab_size, size=8).tolist() for _ in range(2)]
    cache = kvc.init_cache(cfg, 2, 16)
    _, _, cache = forward(cfg, params, jnp.asarray([r[:4] for r in rows]), jnp.tile(jnp.arange(4), (2, 1)), cache)
    _, _, cache = forward(cfg, params, jnp.asarray([r[4:] for r in rows]), jnp.tile(jnp.arange(4, 8), (2, 1)), cache)
    # Row 0 keeps block offsets [0, 1] (a prefix), row 1 keeps nothing.
    cache = kvc.compact(cache, jnp.asarray([4, 4]), jnp.asarray([[0, 1, 0, 0], [0, 0, 0, 0]]), jnp.asarray([2, 0]))
    np.testing.assert_array_equal(np.asarray(cache.length), [6, 4])
    lg, _, _ = forward(cfg, params, jnp.asarray([[7], [7]]), jnp.asarray([[6], [4]]), cache)
    np.testing.assert_allclose(np.asarray(lg[0, 0]), full_logits(cfg, params, rows[0][:6] + [7])[-1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lg[1, 0]), full_logits(cfg, params, rows[1][:4] + [7])[-1], rtol=1e-5, atol=1e-5)


def test_bfloat16_params_close_to_float32(tiny):
    cfg, params = tiny
    toks = list(range(1, 13))
    ref = full_logits(cfg, params, toks)
    cfg16 = cfg.replace(dtype="bfloat16")
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    assert rel_err(full_logits(cfg16, p16, toks), ref) < 5e-2


def test_config_errors():
    with pytest.raises(ValueError, match="n_kv_heads"):
        mc.tiny(n_heads=3, n_kv_heads=2)
    with pytest.raises(ValueError, match="dtype"):
        mc.tiny(dtype="float16")
    with pytest.raises(ValueError, match="max_seq_len"):
        kvc.init_cache(mc.tiny(), 1, 10_000)


def test_cache_free_forward_and_packed_segments(tiny):
    cfg, params = tiny
    rs = np.random.RandomState(6)
    a = rs.randint(0, cfg.vocab_size, size=10).tolist()
    b = rs.randint(0, cfg.vocab_size, size=6).tolist()
    lg, _, c = forward(cfg, params, jnp.asarray([a]), jnp.arange(10)[None], None)
    assert c is None
    ref_a = numpy_reference.forward(cfg, params, a)
    assert rel_err(np.asarray(lg[0]), ref_a) < 1e-5
    # Two sequences packed in one row: positions restart, segment ids separate them.
    packed = jnp.asarray([a + b])
    pos = jnp.asarray([list(range(10)) + list(range(6))])
    seg = jnp.asarray([[0] * 10 + [1] * 6])
    lg, _, _ = forward(cfg, params, packed, pos, None, segment_ids=seg)
    assert rel_err(np.asarray(lg[0, 10:]), numpy_reference.forward(cfg, params, b)) < 1e-5
    assert rel_err(np.asarray(lg[0, :10]), ref_a) < 1e-5


def test_flash_attention_impl_matches_reference(tiny):
    """attention_impl='flash' (Pallas, interpret mode on CPU) against the einsum path:
    packed training forward, then cached prefill + decode past the window."""
    cfg, params = tiny
    fcfg = cfg.replace(attention_impl="flash")
    rs = np.random.RandomState(7)
    toks = jnp.asarray([rs.randint(0, cfg.vocab_size, size=20).tolist()])
    pos = jnp.asarray([list(range(12)) + list(range(6)) + [-1, -1]])
    seg = jnp.asarray([[0] * 12 + [1] * 6 + [2, 2]])
    ref, _, _ = forward(cfg, params, toks, pos, None, segment_ids=seg)
    got, _, _ = forward(fcfg, params, toks, pos, None, segment_ids=seg)
    np.testing.assert_allclose(np.asarray(got[0, :18]), np.asarray(ref[0, :18]), rtol=1e-4, atol=1e-4)
    for c in (cfg, fcfg):
        cache = kvc.init_cache(c, 1, 24)
        lg, _, cache = forward(c, params, toks[:, :10], jnp.arange(10)[None], cache)
        outs = [lg]
        for t in range(10, 14):
            lg, _, cache = forward(c, params, toks[:, t : t + 1], jnp.asarray([[t]]), cache)
            outs.append(lg)
        if c is cfg:
            ref_steps = np.concatenate([np.asarray(o[0]) for o in outs])
    np.testing.assert_allclose(np.concatenate([np.asarray(o[0]) for o in outs]), ref_steps, rtol=1e-4, atol=1e-4)


def test_read_only_pass_then_write_block_equals_a_writing_pass(tiny):
    """``write_cache=False`` + ``kvc.write_block``: the logits and the cache of a writing pass, for
    a causal block and a token tree, over a cache with holes (a rolled-back row, a padded query),
    and each tree node's logits equal its own path scored alone (the independent reference)."""
    cfg, params = tiny
    rs = np.random.RandomState(9)
    prefix = rs.randint(0, cfg.vocab_size, size=(2, 12))
    cache = kvc.init_cache(cfg, 2, 40)
    _, _, cache = forward(cfg, params, jnp.asarray(prefix), jnp.broadcast_to(jnp.arange(12), (2, 12)), cache)
    cache = kvc.rollback(cache, jnp.asarray([12, 9]))  # row 1: three stale slots past its length
    nodes = rs.randint(0, cfg.vocab_size, size=(2, 5))
    pos = jnp.asarray([12 + np.arange(5), [9, 10, 10, 11, -1]])  # row 1: a tree + a padded slot
    parent = [[-1, 0, 1, 2, 3], [-1, 0, 0, 1, -1]]  # row 1, node 4: the padded slot
    anc = np.zeros((2, 5, 5), bool)
    for b in range(2):
        for i in range(5):
            j = i
            while j >= 0:
                anc[b, i, j] = True
                j = parent[b][j]
    for mask in (None, jnp.asarray(anc)):
        lw, _, cw = forward(cfg, params, jnp.asarray(nodes), pos, cache, block_mask=mask)
        lr, _, blk = forward(cfg, params, jnp.asarray(nodes), pos, cache, block_mask=mask, write_cache=False)
        assert isinstance(blk, kvc.BlockKV)
        np.testing.assert_allclose(np.asarray(lr), np.asarray(lw), rtol=1e-5, atol=1e-5)
        cr = kvc.write_block(cache, blk)
        np.testing.assert_array_equal(np.asarray(cr.pos), np.asarray(cw.pos))
        np.testing.assert_array_equal(np.asarray(cr.length), np.asarray(cw.length))
        for a, b in zip(cr.k + cr.v, cw.k + cw.v):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    for i in range(4):  # row 1's real tree nodes against their paths alone
        path = [j for j in range(5) if anc[1, i, j]]
        ref = full_logits(cfg, params, prefix[1, :9].tolist() + [int(nodes[1, j]) for j in path])[-1]
        np.testing.assert_allclose(np.asarray(lr[1, i]), ref, rtol=1e-5, atol=1e-5)
    padded = kvc.write_block(cache, blk.pad_to(8))
    pp = np.asarray(padded.pos)
    assert np.asarray(padded.length).tolist() == [20, 17]
    assert pp[0, 12:17].tolist() == list(range(12, 17)) and (pp[0, 17:20] == -1).all() and (pp[1, 13:17] == -1).all()
