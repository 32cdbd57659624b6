"""Jitted generation on a random tiny model: greedy against step-by-step
argmax over full forwards, ragged batches against batch-of-one, stopping."""

import jax.numpy as jnp
import numpy as np
import pytest

from tokax.testing import random_params
from tokax.decode.generate import Generator
from tokax.decode.loop import decode
from tokax.decode.sampling import SamplingParams
from tokax.model import config as mc
from tokax.model import kv_cache as kvc
from tokax.model.decoder import forward_jit


@pytest.fixture(scope="module")
def gen():
    cfg = mc.tiny(vocab_size=53)
    return Generator(cfg, random_params(cfg, seed=11), eos_ids=(1,), pad_id=0)


def greedy_by_full_forward(cfg, params, prompt, n, eos=1):
    """Oracle: recompute the whole sequence for every new token (no cache)."""
    seq = list(prompt)
    out = []
    for _ in range(n):
        T = len(seq)
        lg, _, _ = forward_jit(cfg, params, jnp.asarray([seq]), jnp.arange(T)[None], kvc.init_cache(cfg, 1, T))
        t = int(np.argmax(np.asarray(lg[0, -1])))
        out.append(t)
        seq.append(t)
        if t == eos:
            break
    return out


def test_greedy_matches_full_recompute(gen):
    prompt = [5, 9, 2, 17, 33, 8, 4]
    got = gen.generate([prompt], max_new_tokens=20)[0]
    assert got == greedy_by_full_forward(gen.cfg, gen.params, prompt, 20)


def test_ragged_batch_rows_equal_batch_of_one(gen):
    rs = np.random.RandomState(0)
    prompts = [rs.randint(2, 53, size=n).tolist() for n in (3, 11, 6, 1)]
    batched = gen.generate(prompts, max_new_tokens=[12, 7, 20, 16])
    for p, budget, row in zip(prompts, [12, 7, 20, 16], batched):
        alone = gen.generate([p], max_new_tokens=budget)[0]
        assert row == alone
        assert len(row) <= budget


def test_stop_on_eos_per_row():
    cfg = mc.tiny(vocab_size=53)
    params = random_params(cfg, seed=11)
    prompts = [[5, 9, 2, 17], [7, 7, 3]]
    free = Generator(cfg, params, eos_ids=(), pad_id=0).generate(prompts, max_new_tokens=15)
    # Declare row 0's 4th generated token an EOS: that row stops there, row 1 is unaffected
    # unless the same id occurs in it (then it stops at its first occurrence).
    eos = free[0][3]
    stopped = Generator(cfg, params, eos_ids=(eos,), pad_id=0).generate(prompts, max_new_tokens=15)
    for f, s in zip(free, stopped):
        cut = f.index(eos) + 1 if eos in f else len(f)
        assert s == f[:cut]


def test_sampling_is_seeded_and_varies(gen):
    sp = SamplingParams.make(temperature=8.0)  # random tiny models are very peaked
    a = gen.generate([[3, 4, 5]], 16, sampling=sp, seed=1)
    b = gen.generate([[3, 4, 5]], 16, sampling=sp, seed=1)
    c = gen.generate([[3, 4, 5]], 16, sampling=sp, seed=2)
    assert a == b and a != c


def test_compiles_once_per_bucket(gen):
    before = decode._cache_size()
    gen.generate([[1, 2, 3]], 10)  # prompt bucket 16, token bucket 16
    mid = decode._cache_size()
    gen.generate([[4, 5, 6, 7, 8, 9]], 12)  # same buckets: no new compile
    gen.generate([[4, 5]], 3, sampling=SamplingParams.make(temperature=0.5, top_k=3))
    assert decode._cache_size() == mid <= before + 1


def test_errors(gen):
    with pytest.raises(ValueError, match="empty"):
        gen.generate([[]], 4)
    with pytest.raises(ValueError, match="max_seq_len"):
        gen.generate([[1] * 4000], 200)
    with pytest.raises(ValueError, match="tokenizer"):
        gen.generate(["text needs a tokenizer"], 4)


def test_greedy_screen_gives_the_same_tokens(gen):
    """``greedy_screen=True``: greedy tokens from the screen equal the full recompute's argmax
    (ragged batch), and sampling (which needs logits) is unchanged, draw for draw."""
    scr = Generator(gen.cfg, gen.params, eos_ids=(1,), pad_id=0, greedy_screen=True)
    assert scr.screen is not None and gen.screen is None
    prompts = [[5, 9, 2, 17, 33, 8, 4], [3], [40, 41, 42, 7]]
    got = scr.generate(prompts, max_new_tokens=12)
    assert got == [greedy_by_full_forward(gen.cfg, gen.params, p, 12) for p in prompts]
    sp = SamplingParams.make(temperature=8.0)
    assert scr.generate(prompts, 12, sampling=sp, seed=3) == gen.generate(prompts, 12, sampling=sp, seed=3)


def test_sampling_matches_the_exact_distribution():
    """Sampled continuations (temperature, top-k and top-p together) follow the processed target
    distribution, enumerated with the model (chi-square over the first three tokens); the same
    test rejects samples drawn at another temperature (the negative control)."""
    from tokax import testing as T

    cfg, params = T.tiny_target()
    gen = Generator(cfg, params, eos_ids=())
    sp = T.sampling_params()
    exact = T.exact_target_distribution(cfg, params, T.SAMPLE_PROMPT, T.N_SAMPLED, sp)
    codes, _ = T.sampled_codes(gen, range(4), sp)
    assert T.chi2_pvalue(codes, exact) > 0.01
    hotter = SamplingParams.make(temperature=1.3, top_k=6, top_p=0.95)
    wrong, _ = T.sampled_codes(gen, range(4), hotter)
    assert T.chi2_pvalue(wrong, exact) < 1e-4
