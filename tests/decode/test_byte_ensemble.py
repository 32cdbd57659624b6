"""Bits per byte of byte-level models and their mixtures, and the fast validity mask.

References: the brute-force oracle `tokax.testing.ByteOracle` (every token
sequence consistent with the text, validity decided by sentencepiece), and
`ByteVocab.valid_next` for the BPE-junction mask. The models are the toy
decoders of `tokax.testing` and, in the slow test, a small model that this
module trains with experiments/train_small_byte_model.py's pipeline.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from tokax.decode.byte_level import BPEJunctions, ByteLM, ByteMixture, bits_per_byte, byte_logprobs
from tokax.testing import ByteOracle, random_params, random_toy_texts, toy_byte_model, toy_byte_vocab
from tokax.tokenize.byte_vocab import ByteVocab

TEXTS = [b"the cat", b"caf\xc3\xa9 th", b"a \xd0\xb6e"]


@pytest.fixture(scope="module")
def oracles():
    cfg, params = toy_byte_model()
    a = ByteOracle(toy_byte_vocab(), cfg, params)
    b = ByteOracle(toy_byte_vocab(), cfg, random_params(cfg, seed=11))  # a second model over the same vocabulary
    return a, b


def _lm(params=None) -> ByteLM:
    cfg, p = toy_byte_model()
    return ByteLM(cfg, p if params is None else params, toy_byte_vocab())


def _brute_prefix_logp(oracle: ByteOracle, text: bytes) -> float:
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
    assert _check_masks(toy_byte_vocab(), random_toy_texts(120, seed=2)) > 500


@pytest.mark.parametrize("mask", ["vocab", "junction"])
def test_mask_choice_keeps_exact_next_byte(mask, oracles):
    cfg, params = toy_byte_model()
    lm = ByteLM(cfg, params, toy_byte_vocab(), mask=mask)
    for prompt in [b"the ca", b" thereaf"]:
        lm.reset(prompt)
        mass, _ = oracles[0].next_byte(prompt)
        np.testing.assert_allclose(lm.next_byte_probs(), mass / mass.sum(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="mask="):
        ByteLM(cfg, params, toy_byte_vocab(), mask="fast")


def _stdlib_bpe(vocab_size: int = 600, n_files: int = 6, path: str | None = None):
    """A byte-fallback BPE trained on a few of the stdlib's train files, and two held-out (eval) files' text."""
    import tempfile

    from tokax.data.stdlib import read_source, stdlib_files
    from tokax.tokenize import train_code_tokenizer

    train = stdlib_files("train")[::97][:n_files]
    heldout = stdlib_files("eval")[:2]
    assert not set(train) & set(heldout)
    texts = [read_source(f) for f in train]
    if path is not None:  # kept where the caller wants it
        tok = train_code_tokenizer(texts, vocab_size, path)
    else:
        with tempfile.TemporaryDirectory() as d:
            tok = train_code_tokenizer(texts, vocab_size, f"{d}/bpe.model")
    return ByteVocab(tok), [read_source(f) for f in heldout]


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
def test_small_model_bits_per_byte(tmp_path):
    """experiments/train_small_byte_model.py's pipeline, shrunk to run in about a minute (a 512-piece
    stdlib BPE, 30 SFT steps of a 2-layer decoder, export, load): the loaded model writes code back
    unchanged and scores it better than uniform bytes, and better than the same decoder untrained
    (drawn as the trainer draws it, which alone scores ~4.8 bits/byte here; ~3.3 after training)."""
    import importlib.util
    from pathlib import Path

    import jax

    from tokax.model.decoder import init_params
    from tokax.train import trainer

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("_train_small", root / "experiments" / "train_small_byte_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    V, steps = 512, 30
    # Where the config looks for its tokenizer, so the trainer uses this one instead of training its own.
    tok, _ = _stdlib_bpe(V, path=str(tmp_path / f"stdlib_bpe_{V}.model"))
    c = mod._config_module().train_config(str(tmp_path))
    c.total_steps, c.eval_every, c.checkpoint_every, c.log_every, c.eval_batches = steps, steps, steps, steps, 1
    c.optimizer.warmup_steps = 5
    c.data.vocab_size, c.data.max_files, c.data.seq_len, c.data.batch_size, c.data.eval_batch_size = V, 8, 128, 8, 8
    c.model.overrides.update(dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=256,
                                  sliding_window=64, max_seq_len=256))
    metrics = trainer.run(c)
    mod.export(c, str(tmp_path), tok.vocab_size, metrics, 0.0)
    cfg, params, vocab = mod.load(tmp_path)
    assert vocab.vocab_size == tok.vocab_size == V and cfg.n_layers == 2
    text = "def add(a, b):\n    return a + b\n"
    assert vocab.decode(vocab.encode(text)) == text.encode()
    bpb = bits_per_byte(ByteLM(cfg, params, vocab), [text])
    fresh = init_params(cfg, jax.random.PRNGKey(1))
    fresh = {**fresh, "embed": fresh["embed"] * c.model.embed_init_std}  # the trainer's random init
    assert bpb < 8.0 and bpb < bits_per_byte(ByteLM(cfg, fresh, vocab), [text])
