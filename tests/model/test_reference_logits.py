"""Real Gemma 3 270M: tokax (float32) against HF transformers on the same GGUF.

The fixture test needs no torch (tests/model/make_reference_fixture.py wrote
the reference); the live test recomputes it when the `bench` extra is there.
"""

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "fixtures" / "hf_reference.npz"


@pytest.fixture(scope="module")
def gemma():
    from tokax.decode.generate import Generator
    from tokax.model.loaders.gguf import load_gemma3
    from tokax.tokenize import load_gemma3_tokenizer

    cfg, params = load_gemma3("float32")
    tok = load_gemma3_tokenizer()
    return Generator(cfg, params, tok), tok


@pytest.fixture(scope="module")
def hf():
    """HF transformers' tokenizer and Gemma3ForCausalLM on the same GGUF, loaded once (the
    GGUF's dequantisation is most of a live test's time)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.model.hf_reference import load_hf

    return load_hf()


def last_logits(gen, ids):
    import jax.numpy as jnp

    from tokax.decode.generate import pad_prompts, prefill
    from tokax.model import kv_cache as kvc

    prompt, lens = pad_prompts([list(ids)], gen.pad_id)
    cache = kvc.init_cache(gen.cfg, 1, prompt.shape[1])
    lg, _ = prefill(gen.cfg, gen.params, jnp.asarray(prompt), jnp.asarray(lens), cache)
    return np.asarray(lg[0])


def test_against_fixture(gemma):
    gen, tok = gemma
    ref = np.load(FIXTURE)
    n = int(ref["n"])
    assert n >= 5
    from tests.model.hf_reference import PROMPTS

    prompts = []
    for i in range(n):
        ids = ref[f"ids_{i}"].tolist()
        assert tok.encode(PROMPTS[i], add_bos=True) == ids  # same tokenization as HF
        lg = last_logits(gen, ids)
        idx = ref[f"logit_idx_{i}"]
        rel = np.abs(lg[idx] - ref[f"logit_val_{i}"]).max() / float(ref[f"absmax_{i}"])
        assert rel <= 1e-3, (i, rel)
        assert np.argsort(-lg)[:5].tolist() == ref[f"top5_{i}"].tolist()
        prompts.append(ids)
    # Greedy 64-token continuations, all prompts in one ragged batch.
    outs = gen.generate(prompts, max_new_tokens=64)
    for i, out in enumerate(outs):
        hf = ref[f"greedy_{i}"].tolist()
        assert out[: len(hf)] == hf, i


def test_live_against_hf_transformers(gemma, hf):
    from tests.model.hf_reference import hf_outputs

    gen, _ = gemma
    # Logits on every prompt; HF's greedy decoding (most of the time) on the first two, as
    # test_against_fixture checks all of them against HF's stored continuations.
    rows = hf_outputs(64, hf, n_greedy=2)
    # All six prompts in one batch: the program test_against_fixture compiled for the same ids.
    outs = gen.generate([r["ids"].tolist() for r in rows], max_new_tokens=64)
    for r, out in zip(rows, outs):
        lg = last_logits(gen, r["ids"].tolist())
        rel = np.abs(lg - r["logits"]).max() / np.abs(r["logits"]).max()
        assert rel <= 1e-3, rel
        assert np.argsort(-lg)[:5].tolist() == np.argsort(-r["logits"])[:5].tolist()
        if r["greedy"] is not None:
            assert out == r["greedy"].tolist()[: len(out)] and len(out) == len(r["greedy"])
    assert sum(r["greedy"] is not None for r in rows) == 2


def test_distilled_draft_as_an_hf_assistant(gemma, hf):
    """The distilled draft converted for HF assisted generation (``hf_reference.hf_draft``) computes
    the tokax draft's logits (full tied head), and HF assisted generation with it returns HF's
    plain greedy tokens (the benchmark's ``--hf-assisted`` comparison)."""
    import jax.numpy as jnp
    import torch

    from tests.model.hf_reference import PROMPTS, hf_draft
    from tokax.decode.proposers.distilled import draft_meta, make_draft
    from tokax.model.decoder import forward_jit

    gen, _ = gemma
    dcfg, dparams = make_draft(gen.cfg, gen.params, "distilled")
    tok, hf = hf
    draft = hf_draft(hf, dparams, draft_meta()["layers"])
    for p in PROMPTS[:3]:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            got = draft(ids).logits[0].numpy()
        want, _, _ = forward_jit(dcfg, dparams["decoder"], jnp.asarray(ids.numpy()), jnp.arange(ids.shape[1])[None])
        want = np.asarray(want[0])
        assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4
        assert (got.argmax(-1) == want.argmax(-1)).all()
    draft.generation_config.num_assistant_tokens = 5
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        plain = hf.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
        assisted = hf.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, assistant_model=draft)
    assert assisted[0].tolist() == plain[0].tolist()
