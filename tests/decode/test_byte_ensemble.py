"""Bits per byte of byte-level models and their mixtures, and the fast validity mask.

References: the brute-force oracle of test_byte_level (every token sequence
consistent with the text, validity decided by sentencepiece), and
`ByteVocab.valid_next` for the BPE-junction mask.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from tests.decode.test_byte_level import Oracle, toy_model
from tests.model.test_decoder import random_params
from tests.tokenize.test_byte_vocab import random_texts, toy_vocab
from tokax.decode.byte_level import BPEJunctions, ByteLM, ByteMixture, bits_per_byte, byte_logprobs
from tokax.tokenize.byte_vocab import ByteVocab

TEXTS = [b"the cat", b"caf\xc3\xa9 th", b"a \xd0\xb6e"]


@pytest.fixture(scope="module")
def oracles():
    a = Oracle()
    b = Oracle()
    b.params = random_params(b.cfg, seed=11)  # a second model over the same vocabulary
    return a, b


def _lm(params=None) -> ByteLM:
    cfg, p = toy_model()
    return ByteLM(cfg, p if params is None else params, toy_vocab())


def _brute_prefix_logp(oracle: Oracle, text: bytes) -> float:
    """log P(text) = log of the sum of Q over the covers of `text`."""
    return math.log(oracle.next_byte(text)[1])


@pytest.mark.parametrize("text", TEXTS)
def test_byte_logprob_equals_brute_force_cover_sum(text, oracles):
    lp = byte_logprobs(_lm(), text)
    assert lp.shape == (len(text),)
    assert lp.sum() == pytest.approx(_brute_prefix_logp(oracles[0], text), abs=2e-5)


def test_bits_per_byte_is_total_over_bytes(oracles):
    want = -sum(_brute_prefix_logp(oracles[0], t) for t in TEXTS) / math.log(2) / sum(map(len, TEXTS))
    assert bits_per_byte(_lm(), TEXTS) == pytest.approx(want, abs=2e-5)


def test_bayes_mixture_probability_is_prior_weighted_sum(oracles):
    """Posterior-weighted next-byte mixing telescopes to P(x) = sum_k pi_k P_k(x)."""
    a, b = oracles
    prior = np.array([0.3, 0.7])
    for text in TEXTS[:2]:
        mix = ByteMixture([_lm(), _lm(b.params)], prior, rule="bayes")
        got = byte_logprobs(mix, text).sum()
        want = np.logaddexp(math.log(prior[0]) + _brute_prefix_logp(a, text), math.log(prior[1]) + _brute_prefix_logp(b, text))
        assert got == pytest.approx(want, abs=2e-5)
        # The posterior after the text is pi_k P_k(x) / sum_j pi_j P_j(x).
        post = prior * np.exp([_brute_prefix_logp(a, text), _brute_prefix_logp(b, text)] - want)
        mix.advance(text[-1])
        np.testing.assert_allclose(mix.weights, post, atol=1e-5)


def test_fixed_mixture_multiplies_mixed_conditionals(oracles):
    """Fixed weights: log P(x) = sum_j log sum_k w_k P_k(x_j | x_<j), P_k(x_j | x_<j) = P_k(x_<=j) / P_k(x_<j)."""
    a, b = oracles
    w = [0.6, 0.4]
    text = TEXTS[0]
    want = 0.0
    for j in range(len(text)):
        cond = [math.exp(_brute_prefix_logp(o, text[: j + 1]) - (_brute_prefix_logp(o, text[:j]) if j else 0.0)) for o in (a, b)]
        want += math.log(w[0] * cond[0] + w[1] * cond[1])
    mix = ByteMixture([_lm(), _lm(b.params)], w, rule="fixed")
    assert byte_logprobs(mix, text).sum() == pytest.approx(want, abs=2e-5)


def test_mixture_rejects_unknown_rule():
    with pytest.raises(ValueError, match="rule="):
        ByteMixture([_lm()], rule="product")


# --------------------------------------------------------- fast validity mask
def _check_masks(v: ByteVocab, texts: list[str], per_text: int | None = None, seed: int = 0) -> int:
    """The BPE-junction mask equals ByteVocab's on every prefix (or `per_text` random prefixes) of `texts`."""
    j = BPEJunctions(v)
    rng = random.Random(seed)
    n = 0
    for text in texts:
        ids = v.encode(text)
        if not ids:
            continue
        cuts = range(1, len(ids) + 1) if per_text is None else rng.sample(range(1, len(ids) + 1), min(per_text, len(ids)))
        for k in cuts:
            v._mask_cache.clear()  # the reference recomputes from scratch
            want = v.valid_next(ids[:k])
            np.testing.assert_array_equal(j.valid_next(ids[:k]), want, err_msg=repr(v.decode(ids[:k])))
            n += 1
    return n


def test_junction_mask_equals_byte_vocab_on_toy_vocab():
    assert _check_masks(toy_vocab(), random_texts(120, seed=2)) > 500


@pytest.mark.parametrize("mask", ["vocab", "junction"])
def test_mask_choice_keeps_exact_next_byte(mask, oracles):
    cfg, params = toy_model()
    lm = ByteLM(cfg, params, toy_vocab(), mask=mask)
    for prompt in [b"the ca", b" thereaf"]:
        lm.reset(prompt)
        mass, _ = oracles[0].next_byte(prompt)
        np.testing.assert_allclose(lm.next_byte_probs(), mass / mass.sum(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="mask="):
        ByteLM(cfg, params, toy_vocab(), mask="fast")


def _stdlib_bpe(vocab_size: int = 600, n_files: int = 6):
    from tokax.train import data as data_lib

    train = data_lib.stdlib_files("train")[::97][:n_files]
    heldout = data_lib.stdlib_files("eval")[:2]
    assert not set(train) & set(heldout)
    texts = [open(f, encoding="utf-8", errors="replace").read() for f in train]
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tok = data_lib.train_code_tokenizer(texts, vocab_size, f"{d}/bpe.model")
    return ByteVocab(tok), [open(f, encoding="utf-8", errors="replace").read() for f in heldout]


def test_stdlib_bpe_round_trips_and_junction_mask_is_exact():
    """The small model's kind of tokenizer (stdlib BPE, byte fallback, '\\n' user-defined) writes
    held-out code back unchanged, and the fast mask equals ByteVocab's on its code contexts."""
    v, heldout = _stdlib_bpe()
    for src in heldout:
        src = src[:3000]
        ids = v.encode(src)
        assert ids is not None and v.decode(ids) == src.encode("utf-8")
        assert v.sp.decode(ids) == src
    lines = [ln for src in heldout for ln in src.splitlines(keepends=True) if ln.strip()][:40]
    assert _check_masks(v, lines, per_text=3) >= 60


@pytest.mark.slow
def test_junction_mask_equals_byte_vocab_on_gemma():
    from tokax.tokenize import load_gemma3_tokenizer

    v = ByteVocab(load_gemma3_tokenizer())
    texts = ["    return sel", "import os\nx = ", "def f(a, b", "        if not", "foo.bar(", "print('hel", "  x = {'a'"]
    assert _check_masks(v, texts, per_text=2) >= 10


@pytest.mark.slow
def test_small_model_bits_per_byte_if_built():
    """When experiments/train_small_byte_model.py has been run: its model scores held-out code
    better than uniform bytes, and Gemma + small Bayes mixture equals the prior-weighted sum."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "experiments" / "train_small_byte_model.py"
    spec = importlib.util.spec_from_file_location("_train_small", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        cfg, params, vocab = mod.load()
    except FileNotFoundError:
        pytest.skip("small byte model not built")
    text = "def add(a, b):\n    return a + b\n"
    assert vocab.decode(vocab.encode(text)) == text.encode()
    assert bits_per_byte(ByteLM(cfg, params, vocab), [text]) < 8.0
