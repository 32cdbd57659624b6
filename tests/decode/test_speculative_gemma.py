"""Gemma 3 270M: speculative methods, chain and token tree, reproduce plain greedy
decoding token for token, and the job prints one JSON line per prompt (slow).

Each method compiles its own decode loop around the real model (about a minute on 2 CPU
cores), so `make test` runs one method of each kind of proposer and verification on Gemma
(``CI_METHODS``); ``TOKAX_TEST_ALL=1`` (`make test-all`) runs every registered method.
Every method is proven lossless on every `make test` by tests/decode/test_lossless.py
(tiny targets, greedy and chi-square); what this module adds is the real model's numerics
through the bf16 screen, which all methods share.
"""

import io
import json
from contextlib import redirect_stdout

import pytest

import configs.speculative as spec_config
from tests import all_only
from tokax.decode.generate import Generator
from tokax.jobs.speculative import METHODS, make_generator, run

PROMPTS = [
    'def is_prime(n):\n    """Return True if n is a prime number."""\n',
    "Rewrite in the past tense: The cat sits on the mat and the dog sleeps by the door.\nPast tense:",
]
N_NEW = 32
# One of each kind: a draft model on the chain loop, target heads on the chain loop, a
# datastore tree, a dynamic draft-model tree, and the tree loop's observe hook.
CI_METHODS = ("draft", "blockwise", "retrieval_tree", "dyspec", "token_recycling")


@pytest.fixture(scope="module")
def gemma():
    from tokax.model.loaders.gguf import load_gemma3
    from tokax.tokenize import load_gemma3_tokenizer

    cfg, params = load_gemma3("float32")
    tok = load_gemma3_tokenizer()
    return cfg, params, tok, Generator(cfg, params, tok).generate(PROMPTS, N_NEW)


def test_every_registered_method_is_run_here():
    """configs/speculative.py has a block for every method of the registry, each run below."""
    from tokax.decode import methods

    assert set(spec_config.METHODS) == set(METHODS) == set(methods.METHODS)
    c = spec_config.get_config()
    assert all(c[name].to_dict() == methods.default_block(name).to_dict() for name in METHODS)
    assert set(CI_METHODS) <= set(METHODS)


@pytest.mark.slow
@pytest.mark.parametrize("method", [
    pytest.param(m, marks=() if m in CI_METHODS else all_only("one method of each kind here, every method "
                                                              "in tests/decode/test_lossless.py"))
    for m in METHODS])
def test_gemma_greedy_lossless(gemma, method):
    """Chain and tree methods, each with its config's defaults as a user gets them (the shipped
    distilled draft, heads, adapter and acceptance head; k = 5, the default trees)."""
    cfg, params, tok, ref = gemma
    c = spec_config.get_config(method)
    gen = make_generator(c, cfg, params, tok)
    assert gen.screen is not None  # greedy verification goes through the bf16 screen (configs' default)
    outs, stats = gen.generate(PROMPTS, N_NEW)
    assert outs == ref
    assert all(s["new_tokens"] == len(o) and s["target_passes"] >= 1 for s, o in zip(stats, outs))
    if method in ("draft", "retrieval", "retrieval_tree", "tree", "dyspec", "spectr", "token_recycling"):
        # The distilled draft, the standard library's datastore and the target's own past top-k
        # all get drafts accepted.
        assert sum(s["accepted"] for s in stats) > 0


@pytest.mark.slow
def test_every_method_builds_from_its_defaults_on_gemma(gemma):
    """Every method's config block, as a user gets it, fits the shipped assets and the real model
    (the class of fault where blockwise's default k outran the heads file): the generator builds
    and its proposer passes the loop's check. Building compiles nothing; the methods outside
    CI_METHODS decode on Gemma under make test-all."""
    cfg, params, tok, _ = gemma
    for method in METHODS:
        gen = make_generator(spec_config.get_config(method), cfg, params, tok)
        assert gen.screen is not None, method


@pytest.mark.slow
def test_job_prints_json_lines(gemma, tmp_path):
    """The job (prompts file, Gemma loaded by the job itself) prints one JSON line per prompt.
    It decodes the batch test_gemma_greedy_lossless[draft] did, so it reuses that compiled loop."""
    cfg, params, tok, ref = gemma
    f = tmp_path / "prompts.json"
    f.write_text(json.dumps(PROMPTS))
    c = spec_config.get_config("draft")
    c.prompts_file, c.json, c.max_new_tokens, c.batch_size = str(f), True, N_NEW, 8
    buf = io.StringIO()
    with redirect_stdout(buf):
        rows = run(c)
    lines = [json.loads(x) for x in buf.getvalue().splitlines() if x.strip()]
    assert len(lines) == len(PROMPTS) and lines == rows
    assert [x["token_ids"] for x in lines] == ref and [x["prompt"] for x in lines] == PROMPTS
    assert all(set(x["stats"]) >= {"proposed", "accepted", "target_passes", "mean_accepted"} for x in lines)


@pytest.mark.slow
def test_gemma_screened_argmax_on_real_hidden_states(gemma):
    """The screen's greedy tokens equal the float32 logits' argmax at every
    position of 500 tokens of real code (taken 6 positions at a time, as a
    verify pass of K = 5 does)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from tokax.decode.speculative import __file__ as src
    from tokax.model.decoder import forward_jit
    from tokax.model.screen import make_argmax_screen, screened_argmax

    cfg, params, tok, _ = gemma
    ids = jnp.asarray([tok.encode(open(src).read()[:4000], add_bos=True)[:504]])
    logits, hidden, _ = forward_jit(cfg, params, ids, jnp.arange(ids.shape[1])[None])
    ref = np.asarray(jnp.argmax(logits[0], -1))
    screen = make_argmax_screen(params["embed"])
    f = jax.jit(screened_argmax)
    got = np.concatenate([np.asarray(f(screen, params["embed"], hidden[0, i:i + 6])) for i in range(0, 504, 6)])
    np.testing.assert_array_equal(got, ref)


@pytest.mark.slow
def test_gemma_plain_greedy_through_the_screen(gemma):
    """``Generator(greedy_screen=True)`` (the speculative benchmark's plain baseline) decodes
    exactly what float32 plain greedy does."""
    cfg, params, tok, ref = gemma
    assert Generator(cfg, params, tok, greedy_screen=True).generate(PROMPTS, N_NEW) == ref
