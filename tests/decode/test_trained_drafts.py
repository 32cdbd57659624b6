"""The shipped SpecDec++ head and Kangaroo adapter for Gemma 3 270M do better than their
untrained defaults on held-out documents of the greedy corpus (slow: the real model).

Both were trained on the first 90% of the corpus's documents (``experiments/
train_specdec_head.py``, ``experiments/train_kangaroo_adapter.py``); the tests take
documents from the last 10% and recompute every number here, from the draft's own passes
and the target's greedy tokens the corpus stores (``tests/decode/test_greedy_corpus.py``
re-decodes part of it)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokax.decode.methods import trained_path
from tokax.model.decoder import padded_positions
from tokax.data.greedy import continuation_batch

N_DOCS = 32  # held-out documents
CONT = 64


@pytest.fixture(scope="module")
def setup():
    from tokax.model.loaders.gguf import load_gemma3
    from tokax.tokenize import load_gemma3_tokenizer
    from tokax.data.greedy import greedy_code_pairs

    cfg, params = load_gemma3("float32")
    pairs = greedy_code_pairs(load_gemma3_tokenizer())
    return cfg, params, pairs[-N_DOCS:]


@pytest.mark.slow
def test_shipped_specdec_head_beats_the_constant_prior(setup):
    """Held-out BCE of the shipped head's acceptance predictions for the draft's greedy
    candidates, against the best constant (the label rate of these very documents: a
    constant that has seen the test labels)."""
    from tokax.decode.proposers import load_params
    from tokax.decode.proposers.distilled import make_draft
    from tokax.decode.proposers.draft_model import draft_forward, draft_unembed
    from tokax.decode.proposers.specdec_pp import acceptance_prob, candidate_hidden

    cfg, params, pairs = setup
    dcfg, dp = make_draft(cfg, params, "distilled")
    head = load_params(trained_path("head", "trained"))
    ys, ps = [], []
    for s in range(0, N_DOCS, 16):
        toks, lengths, at, nxt = continuation_batch(pairs[s:s + 16])
        pos = padded_positions(lengths, toks.shape[1])
        _, h, _ = draft_forward(dcfg, dp, jnp.asarray(toks), pos, return_logits=False)
        h_at = jnp.take_along_axis(h, jnp.asarray(at)[:, :, None], axis=1)
        cand = jnp.argmax(draft_unembed(dcfg, dp, h_at), -1).astype(jnp.int32)
        hc = candidate_hidden(dcfg, dp, jnp.asarray(toks), jnp.asarray(lengths), jnp.asarray(at), cand)
        ys.append((np.asarray(cand) == nxt).ravel())
        ps.append(np.asarray(acceptance_prob(head, hc), np.float64).ravel())
    y, a = np.concatenate(ys).astype(np.float64), np.clip(np.concatenate(ps), 1e-7, 1 - 1e-7)
    m = y.mean()
    bce = -(y * np.log(a) + (1 - y) * np.log(1 - a)).mean()
    const = -(m * np.log(m) + (1 - m) * np.log(1 - m))
    assert 0.1 < m < 0.9  # both outcomes occur
    assert bce < 0.75 * const, (bce, const)
    assert ((a > 0.5) == (y > 0.5)).mean() > max(m, 1 - m) + 0.1


@pytest.mark.slow
def test_shipped_kangaroo_adapter_agrees_with_the_target(setup):
    """Held-out top-1 agreement with the target's greedy tokens of the self-draft (first
    layers + adapter + the subset head): the shipped adapter against the identity adapter
    (plain early exit) with the same head."""
    from tokax.decode.proposers import KangarooProposer
    from tokax.decode.proposers.draft_model import draft_forward, draft_unembed
    from tokax.decode.proposers.kangaroo import init_adapter, load_adapter, with_subset_head

    cfg, params, pairs = setup
    from tokax.decode.methods import default_block

    n = default_block("kangaroo").layers
    prop = KangarooProposer.make(cfg, n)
    trained = load_adapter(trained_path("adapter", "trained"), cfg, params, n)
    identity = with_subset_head(params, init_adapter(cfg, n, jax.random.PRNGKey(0), identity=True),
                                trained["head_ids"])

    def agreement(pp):
        hits = 0
        dp = prop.draft_params(params, pp)
        for s in range(0, N_DOCS, 16):
            toks, lengths, at, nxt = continuation_batch(pairs[s:s + 16])
            pos = padded_positions(lengths, toks.shape[1])
            _, h, _ = draft_forward(prop.cfg, dp, jnp.asarray(toks), pos, return_logits=False)
            h_at = jnp.take_along_axis(h, jnp.asarray(at)[:, :, None], axis=1)
            hits += int((np.asarray(jnp.argmax(draft_unembed(prop.cfg, dp, h_at), -1)) == nxt).sum())
        return hits / (N_DOCS * CONT)

    base, got = agreement(identity), agreement(trained)
    assert got > 0.2 and got > base + 0.15, (got, base)
