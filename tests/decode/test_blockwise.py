"""Blockwise parallel decoding / Medusa heads: the heads' logits against numpy, the Medusa
top-k tree against a brute-force cartesian product, shape errors, training on a tiny frozen
target, subset heads, and a slow Gemma 3 270M check. The method's losslessness (greedy and
sampled, with a misaligned-q negative control) is ``tests/decode/test_lossless.py``."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import all_only
from tokax import testing as T
from tokax.decode.generate import Generator
from tokax.decode.proposers.blockwise import (
    BlockwiseProposer,
    apply_heads,
    head_logits,
    head_topk_tree,
    init_heads,
    tree_structure,
)
from tokax.decode.speculative import SpeculativeGenerator

K = 3
V = T.TINY_VOCAB


def numpy_head_logits(hp, embed, h):
    """Reference: f_i = h + SiLU(W_i h + b_i), logits = E f_i, in float64 numpy."""
    h = np.asarray(h, np.float64)
    w, b, e = (np.asarray(x, np.float64) for x in (hp["w"], hp["b"], embed))
    z = np.einsum("...d,kde->...ke", h, w) + b
    f = h[..., None, :] + z / (1.0 + np.exp(-z))
    return f @ e.T


@pytest.fixture(scope="module")
def heads(target):
    cfg, _ = target
    return init_heads(cfg.d_model, K, jax.random.PRNGKey(3), scale=1.5)


@pytest.fixture(scope="module")
def target():
    return T.tiny_target()


@pytest.fixture(scope="module")
def plain_greedy(target):
    cfg, params = target
    base, budgets = T.ragged_prompts()
    return Generator(cfg, params, eos_ids=()).generate(base, budgets)


def test_head_logits_match_numpy(target, heads):
    cfg, params = target
    h = np.random.RandomState(0).randn(5, cfg.d_model).astype(np.float32)
    got = np.asarray(head_logits(heads, params["embed"], jnp.asarray(h)))
    np.testing.assert_allclose(got, numpy_head_logits(heads, params["embed"], h), rtol=1e-4, atol=1e-4)
    # Zero-init heads are the target's own next-token head: E h.
    z = np.asarray(apply_heads(init_heads(cfg.d_model, 2), jnp.asarray(h)))
    np.testing.assert_allclose(z, np.repeat(h[:, None], 2, 1), atol=1e-6)


def test_topk_tree_is_the_cartesian_product(target, heads):
    cfg, params = target
    topk = (3, 2, 2)
    h = np.random.RandomState(1).randn(4, cfg.d_model).astype(np.float32)
    tree = head_topk_tree(heads, params["embed"], jnp.asarray(h), topk)
    ref = numpy_head_logits(heads, params["embed"], h)  # [4, K, V]
    rank = np.argsort(-ref, axis=-1, kind="stable")
    tokens = np.asarray(tree.tokens)
    paths = [p for d in range(1, 4) for p in itertools.product(*(range(t) for t in topk[:d]))]
    assert len(tree.parents) == len(paths) == 3 + 6 + 12
    for n, path in enumerate(paths):
        d = len(path)
        assert tree.depth[n] == d
        assert tree.parents[n] == (paths.index(path[:-1]) if d > 1 else -1)
        assert tree.parents[n] < n  # parents come first
        np.testing.assert_array_equal(tokens[:, n], rank[:, d - 1, path[-1]])
    np.testing.assert_allclose(np.asarray(tree.q_logits()), ref[:, tree.depth - 1], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="topk"):
        tree_structure(())


def test_heads_shape_errors(target):
    cfg, params = target
    gen = SpeculativeGenerator(cfg, params, BlockwiseProposer(k=4), init_heads(cfg.d_model, 2), eos_ids=())
    with pytest.raises(ValueError, match="only 2 heads"):
        gen.generate([[1, 2]], 2)


PROMPTS = ['def fib(n):\n    """Return the n-th Fibonacci number."""\n', "import os\nimport sys\n\n\ndef main():\n"]


@pytest.mark.slow
@all_only("blockwise (shipped heads) on Gemma in tests/decode/test_speculative_gemma.py, lookahead on tiny targets")
def test_gemma_greedy_lossless():
    from tokax.decode.proposers.lookahead import LookaheadProposer
    from tokax.model.loaders.gguf import load_gemma3
    from tokax.tokenize import load_gemma3_tokenizer

    cfg, params = load_gemma3("float32")
    tok = load_gemma3_tokenizer()
    ref = Generator(cfg, params, tok).generate(PROMPTS, 16)
    for prop, pp in ((BlockwiseProposer(k=3), init_heads(cfg.d_model, 3)), (LookaheadProposer(k=4, ngram=3), None)):
        outs, stats = SpeculativeGenerator(cfg, params, prop, pp, tok).generate(PROMPTS, 16)
        assert outs == ref, type(prop).__name__
        assert all(s["new_tokens"] == len(o) for s, o in zip(stats, outs))


# ----------------------------------------------------------------------------
# training (tokax.train.heads) on a tiny frozen target
# ----------------------------------------------------------------------------


def numpy_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def arithmetic_rows(n, length, vocab, seed):
    """Rows x_t = x_0 + t c (mod vocab), random x_0 and step c per row: a target's
    greedy continuation of such context is a function of (x_0, c, t), which
    its hidden state partly encodes (a random target's own greedy rollouts
    collapse into repeats, which the untrained copy-next heads already get)."""
    rs = np.random.RandomState(seed)
    x0, c = rs.randint(0, vocab, size=(n, 1)), rs.randint(1, vocab, size=(n, 1))
    return ((x0 + c * np.arange(length)[None]) % vocab).astype(np.int32)


def test_heads_loss_matches_numpy(target, heads):
    from tokax.train.heads import heads_loss, restrict_vocab, shift_ahead

    cfg, params = target
    rs = np.random.RandomState(2)
    hidden = rs.randn(2, 7, cfg.d_model).astype(np.float32)
    tokens = rs.randint(0, V, size=(2, 7)).astype(np.int32)
    labels, valid = shift_ahead(tokens, K, 1)
    E = np.asarray(params["embed"], np.float64)
    lq = numpy_log_softmax(numpy_head_logits(heads, E, hidden))  # [2, 7, K, V]
    lp = numpy_log_softmax(hidden.astype(np.float64) @ E.T)  # target at each position
    w = 0.3
    want = 0.0
    for i in range(1, K + 1):
        ce, kl = [], []
        for b in range(2):
            for t in range(7 - 1 - i):  # token t+1+i exists
                ce.append(-lq[b, t, i - 1, tokens[b, t + 1 + i]])
                p = np.exp(lp[b, t + i])
                kl.append(np.sum(p * (lp[b, t + i] - lq[b, t, i - 1])))
        want += (1 - w) * np.mean(ce) + w * np.mean(kl)
    got, _ = heads_loss(apply_heads, heads, jnp.asarray(hidden), params["embed"], jnp.asarray(labels),
                        jnp.asarray(valid), distill_weight=w)
    assert abs(float(got) - want) < 1e-4 * max(1.0, want)
    # Sampled softmax: the loss over E[cand] with labels remapped to cand indices.
    cand, local = restrict_vocab(labels, 6, np.arange(V), V, np.random.default_rng(0))
    assert len(cand) == 6 and (cand[local] == labels).all()
    sub = numpy_log_softmax(numpy_head_logits(heads, E[cand], hidden))
    ce_sub = np.mean([[-sub[b, t, i - 1, local[b, t, i - 1]] for b in range(2) for t in range(6 - i)]
                      for i in range(1, K + 1)][0])
    got_sub, m = heads_loss(apply_heads, heads, jnp.asarray(hidden), params["embed"][jnp.asarray(cand)],
                            jnp.asarray(local), jnp.asarray(valid))
    assert abs(float(m["ce"][0]) - ce_sub) < 1e-4 * max(1.0, ce_sub)


def test_heads_learn_target_greedy_tokens():
    """Heads trained on the frozen target's hidden states predict its greedy
    tokens 2..K+1 ahead on held-out rows far better than the untrained
    (copy-next) heads; accuracy checked against a numpy recomputation from
    the target's own logits."""
    from tokax.model import config as mc
    from tokax.model.decoder import forward_jit
    from tokax.testing import model_params
    from tokax.train.heads import head_accuracy, shift_ahead, target_hidden, train_heads

    Vt, T = 16, 24
    cfg = mc.tiny(vocab_size=Vt)
    params = model_params(cfg, seed=1)
    rows = arithmetic_rows(128, T, Vt, seed=0)
    hidden, greedy = target_hidden(cfg, params, rows, rows=128)
    logits = np.asarray(forward_jit(cfg, params, jnp.asarray(rows), jnp.broadcast_to(jnp.arange(T), rows.shape))[0])
    np.testing.assert_array_equal(greedy, logits.argmax(-1))  # the pass really is the target's
    labels, valid = shift_ahead(greedy, K, 0)
    tr, ev = slice(0, 96), slice(96, 128)
    h0 = init_heads(cfg.d_model, K)
    rs = np.random.default_rng(0)

    def batches(n):
        for _ in range(n):
            i = rs.choice(96, size=32, replace=False)
            yield {"hidden": hidden[tr][i], "labels": labels[tr][i], "valid": valid[tr][i]}

    trained, losses = train_heads(apply_heads, h0, params["embed"], batches(200), learning_rate=1e-2, total_steps=200)
    assert len(losses) == 200 and np.mean(losses[-20:]) < 0.7 * np.mean(losses[:5])

    def numpy_acc(hp):
        top = numpy_head_logits(hp, params["embed"], hidden[ev]).argmax(-1)  # [32, T, K]
        want = logits[ev].argmax(-1)  # [32, T] the target's greedy token after each position
        return np.array([(top[:, : T - i, i - 1] == want[:, i:]).mean() for i in range(1, K + 1)])

    before = head_accuracy(apply_heads, h0, hidden[ev], params["embed"], labels[ev], valid[ev])
    after = head_accuracy(apply_heads, trained, hidden[ev], params["embed"], labels[ev], valid[ev])
    np.testing.assert_allclose(before, numpy_acc(h0), atol=1e-6)
    np.testing.assert_allclose(after, numpy_acc(trained), atol=1e-6)
    assert (after > before + 0.1).all(), (before, after)


def test_subset_heads_logits_and_greedy_identity(target, heads, plain_greedy):
    """Heads over a token subset (head_vocab): the logits of the subset equal the full heads'
    (numpy reference), q = 0 elsewhere, and greedy blockwise decoding still equals plain greedy."""

    cfg, params = target
    ids = jnp.asarray([0, 1, 3, 4, 6], jnp.int32)
    sub = dict(heads, head_ids=ids)
    h = np.random.RandomState(1).randn(5, cfg.d_model).astype(np.float32)
    got = np.asarray(head_logits(sub, params["embed"], jnp.asarray(h)))
    ref = numpy_head_logits(heads, params["embed"], h)
    np.testing.assert_allclose(got[..., np.asarray(ids)], ref[..., np.asarray(ids)], rtol=1e-4, atol=1e-4)
    outside = np.setdiff1d(np.arange(V), np.asarray(ids))
    assert (got[..., outside] < -1e29).all()
    base, budgets = T.ragged_prompts()
    outs, st = SpeculativeGenerator(cfg, params, BlockwiseProposer(k=K), sub, eos_ids=()).generate(base, budgets)
    assert outs == plain_greedy
    assert sum(s["accepted"] for s in st) > 0
