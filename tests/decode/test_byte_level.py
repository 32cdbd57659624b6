"""Exact byte-level probabilities (Phan et al.) against brute-force enumeration.

The oracle (`tokax.testing.ByteOracle`) enumerates every token sequence
whose bytes are consistent with the text (all segmentations, byte tokens
included), scores each with the model's next-token log-probs from cache-free
forwards, decides validity with sentencepiece itself (`brute_valid`), and
sums Q over the covers, in float64. Prefixes end at token boundaries, inside
tokens and inside characters. The model is `tokax.testing`'s toy decoder.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tokax.decode.byte_level import STOP, ByteLM, ByteMixture, sample_bytes
from tokax.decode.token_healing import complete_tokens
from tokax.model import config as mc
from tokax.testing import ByteOracle, batch_logits, random_params, toy_byte_model, toy_byte_vocab, toy_spm_proto
from tokax.tokenize.byte_vocab import SPECIAL, ByteVocab


def toy_oracle(renormalize: bool = True) -> ByteOracle:
    return ByteOracle(toy_byte_vocab(), *toy_byte_model(), renormalize=renormalize)


PROMPTS = [b"", b"t", b"the", b"the c", b"the ca", b"the cat", b" thereaf", b"caf\xc3", b"a \xd0", "a \u0436".encode()]


@pytest.fixture(scope="module")
def oracle():
    return toy_oracle()


@pytest.fixture(scope="module")
def lm():
    cfg, params = toy_byte_model()
    return ByteLM(cfg, params, toy_byte_vocab())


@pytest.mark.parametrize("prompt", PROMPTS)
def test_next_byte_equals_brute_force(prompt, oracle, lm):
    lm.reset(prompt)
    got = lm.next_byte_probs()
    mass, p_x = oracle.next_byte(prompt)
    # The lemma: next-byte masses (and the end) add up to P(x), the sum over covers.
    assert mass.sum() == pytest.approx(p_x, rel=1e-9)
    np.testing.assert_allclose(got, mass / mass.sum(), atol=1e-6, rtol=0)
    assert lm.mass_ratio == pytest.approx(1.0, abs=1e-9)


def test_advancing_equals_restarting(lm):
    """Bytes appended one at a time give the distributions of a fresh reset."""
    cfg, params = toy_byte_model()
    fresh = ByteLM(cfg, params, toy_byte_vocab())
    lm.reset(b"th")
    for b in b"e cat\xc3\xa9 the":
        lm.advance(b)
        fresh.reset(lm.text)
        np.testing.assert_allclose(lm.next_byte_probs(), fresh.next_byte_probs(), atol=1e-6, rtol=0)


def test_string_probability_is_canonical_token_probability(oracle, lm):
    """P_byte(text, then end) = Q(encode(text) + [EOS]); the prefix probability
    P_byte(text) = sum over covers, which counts, besides encode(text), every
    valid sequence whose last token runs past the end of the text."""
    v = toy_byte_vocab()
    extra = []
    for text in [b"the cat", b"hat ", b"caf\xc3\xa9"]:
        lm.reset(b"")
        logp = 0.0
        for b in text:
            logp += math.log(lm.next_byte_probs()[b])
            lm.advance(b)
        log_end = logp + math.log(lm.next_byte_probs()[STOP])
        canon = tuple(v.encode(text))
        want_end = oracle.log_q_seq(canon + (v.eos_id,))
        # float32 logits from two different forward paths (KV-cache tree vs full), ~8 steps.
        assert log_end == pytest.approx(want_end, abs=2e-5)
        _, p_prefix = oracle.next_byte(text)
        assert logp == pytest.approx(math.log(p_prefix), abs=2e-5)
        # The canonical encoding alone is at most the prefix probability; the rest is the
        # mass of sequences whose last token runs past the text (e.g. [the, ▁cats]).
        extra.append(math.log(p_prefix) - oracle.log_q_seq(canon))
    assert min(extra) > -1e-9 and max(extra) > 1e-3


@pytest.mark.parametrize("prompt", [b"the ca", b"caf\xc3"])
def test_paper_mode_without_renormalization(prompt):
    """renormalize=False: Q = p masked to valid tokens, each next-byte distribution normalized."""
    cfg, params = toy_byte_model()
    lm = ByteLM(cfg, params, toy_byte_vocab(), renormalize=False)
    lm.reset(prompt)
    mass, _ = toy_oracle(renormalize=False).next_byte(prompt)
    np.testing.assert_allclose(lm.next_byte_probs(), mass / mass.sum(), atol=1e-6, rtol=0)
    assert lm.mass_ratio <= 1.0 + 1e-12  # the invalid mass after the text is dropped


def test_greedy_sampler_follows_argmax_and_stops_mid_token(lm):
    out = sample_bytes(lm, b"the c", max_new_bytes=5)
    # Replay: each byte is the argmax of the exact distribution at its prefix.
    cfg, params = toy_byte_model()
    ref = ByteLM(cfg, params, toy_byte_vocab())
    ctx = b"the c"
    for k, b in enumerate(out.data):
        ref.reset(ctx)
        p = ref.next_byte_probs()
        assert b == int(np.argmax(p))
        assert out.logprobs[k] == pytest.approx(math.log(p[b]), abs=1e-6)
        ctx += bytes([b])
    assert len(out.data) == 5 or out.stopped


def test_temperature_sampling_is_seeded(lm):
    a = sample_bytes(lm, b"the", max_new_bytes=6, temperature=1.0, seed=5)
    b = sample_bytes(lm, b"the", max_new_bytes=6, temperature=1.0, seed=5)
    assert a.data == b.data and a.logprobs == b.logprobs


def test_mixture_of_two_vocabularies():
    """Two models over different vocabularies mix at the byte level."""
    v2 = ByteVocab(toy_spm_proto(vocab_size=300, lines=300, words=10, seed=1))
    assert v2.vocab_size != toy_byte_vocab().vocab_size
    cfg2 = mc.tiny(vocab_size=v2.vocab_size)
    m1 = ByteLM(*toy_byte_model(), toy_byte_vocab())
    m2 = ByteLM(cfg2, random_params(cfg2, seed=4), v2)
    mix = ByteMixture([m1, m2], [0.25, 0.75])
    mix.reset(b"the ca")
    np.testing.assert_allclose(mix.next_byte_probs(), 0.25 * m1.next_byte_probs() + 0.75 * m2.next_byte_probs())
    out = sample_bytes(mix, b"the ca", max_new_bytes=4)
    assert m1.text == m2.text == b"the ca" + out.data[:-1]


# ------------------------------------------------------- token-level baselines
def greedy_oracle(ids: list[int], n: int, first_allowed=None) -> list[int]:
    cfg, params = toy_byte_model()
    v = toy_byte_vocab()
    seq = [v.bos_id] + ids
    out = []
    for k in range(n):
        toks = np.zeros((1, 32), np.int32)  # one shape: padding after the sequence is never seen
        toks[0, : len(seq)] = seq
        lg = np.asarray(batch_logits(cfg, params, toks))[0, len(seq) - 1]
        if k == 0 and first_allowed is not None:
            lg = np.where(first_allowed, lg, -np.inf)
        t = int(np.argmax(lg))
        out.append(t)
        seq.append(t)
        if t in v.stop_ids:
            break
    return out


def test_naive_completion_is_greedy_after_the_cut_tokens():
    cfg, params = toy_byte_model()
    v = toy_byte_vocab()
    got = complete_tokens(cfg, params, v, "the ca", 6)
    toks = greedy_oracle(v.sp.encode("the ca"), 6)
    want = b"".join(v.token_bytes[t] for t in toks)[:6]
    assert got.data == want and got.token_ids == toks[: len(got.token_ids)]


def test_token_healing_regenerates_the_last_token():
    cfg, params = toy_byte_model()
    v = toy_byte_vocab()
    ids = v.sp.encode("the ca")
    heal = v.token_bytes[ids[-1]]
    allowed = np.array([v.kinds[t] != SPECIAL and v.token_bytes[t].startswith(heal) for t in range(v.vocab_size)])
    toks = greedy_oracle(ids[:-1], 6, first_allowed=allowed)
    got = complete_tokens(cfg, params, v, "the ca", 6, mode="token_healing")
    written = b"".join(v.token_bytes[t] for t in toks)
    assert written.startswith(heal)
    assert got.data == written[len(heal) :][:6]
    assert got.token_ids[0] == toks[0] and allowed[got.token_ids[0]]


def test_stop_bytes_cut_the_completion():
    cfg, params = toy_byte_model()
    v = toy_byte_vocab()
    full = complete_tokens(cfg, params, v, "the", 12)
    stop = full.data[2:3]
    cut = complete_tokens(cfg, params, v, "the", 12, stop_bytes=stop)
    assert cut.data == full.data[: full.data.index(stop) + 1]
    bl = sample_bytes(ByteLM(cfg, params, v), b"the", 12)
    if len(bl.data) > 3:
        s = bl.data[3:4]
        assert sample_bytes(ByteLM(cfg, params, v), b"the", 12, stop_bytes=s).data == bl.data[: bl.data.index(s) + 1]


# -------------------------------------------------------------------- Gemma 3
@pytest.mark.slow
def test_gemma_byte_greedy_completes_a_mid_token_prompt():
    from tokax.model.loaders.gguf import load_gemma3
    from tokax.tokenize import load_gemma3_tokenizer

    cfg, params = load_gemma3("float32")
    v = ByteVocab(load_gemma3_tokenizer())
    lm = ByteLM(cfg, params, v)
    prompt = "import numpy as np\n\ndef mean(values):\n    return sum(values) / len(val"
    lm.reset(prompt)
    masses = []
    data = bytearray()
    for _ in range(6):
        p = lm.next_byte_probs()
        assert p.sum() == pytest.approx(1.0, abs=1e-9) and (p >= 0).all()
        masses.append(lm.mass_ratio)
        b = int(np.argmax(p))
        if b == STOP:
            break
        data.append(b)
        lm.advance(b)
    assert bytes(data).startswith(b"ues)")
    # Renormalized canonical model: next-byte masses add up to the cover mass.
    np.testing.assert_allclose(masses, 1.0, atol=1e-6)
    assert lm.calls <= 2 + len(data) * 2


# ------------------------------------------------------------------------ job
def _config(mode=None):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "configs" / "byte_sample.py"
    spec = importlib.util.spec_from_file_location("_byte_sample_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(mode)


@pytest.mark.parametrize("key,value", [("mode", "bytes"), ("max_new_bytes", 0), ("temperature", -1.0), ("dtype", "fp8")])
def test_job_names_bad_config_values(key, value):
    from tokax.jobs import ConfigError
    from tokax.jobs.byte_sample import validate

    c = _config("token_healing")
    assert c.job == "byte_sample" and c.mode == "token_healing" and c.temperature == 0.0
    validate(c)
    c[key] = value
    with pytest.raises(ConfigError, match=f"--config.{key}="):
        validate(c)


@pytest.mark.slow
def test_job_writes_only_the_continuation(tmp_path):
    import json

    from tokax.jobs.byte_sample import run

    prompts = ["def add(a, b):\n    return a + ", "print('hel"]
    f = tmp_path / "prompts.json"
    f.write_text(json.dumps(prompts))
    for mode in ("naive", "token_healing", "byte"):
        c = _config(mode)
        c.prompts_file, c.max_new_bytes, c.json, c.stop_at_newline = str(f), 12, True, True
        rows = run(c)
        assert [r["prompt"] for r in rows] == prompts
        for r in rows:
            assert r["mode"] == mode and 0 < len(r["text"].encode()) <= 12
            assert not r["text"].startswith(r["prompt"][:5])
        if mode == "byte":
            assert rows[1]["text"].startswith("lo")  # print('hel -> print('hello


@pytest.mark.slow
def test_job_keeps_the_bytes_of_a_continuation_cut_inside_a_character(tmp_path):
    """A byte-mode continuation that ends inside a UTF-8 character keeps its bytes (``bytes_hex``)
    beside the replacement-character ``text``; a prompt may itself end inside a character
    (``{"hex": ...}``)."""
    import json

    from tokax.jobs.byte_sample import run

    inside = "Un café, deux cafés, trois caf".encode() + b"\xc3"  # the prompt ends inside 'é'
    f = tmp_path / "prompts.json"
    f.write_text(json.dumps(["Un café, deux cafés, trois caf", {"hex": inside.hex()}]))
    c = _config("byte")
    c.prompts_file, c.max_new_bytes, c.json = str(f), 1, True
    first, second = run(c)
    assert first["prompt"] == "Un café, deux cafés, trois caf" and second["prompt"] == {"hex": inside.hex()}
    lead, cont = bytes.fromhex(first["bytes_hex"]), bytes.fromhex(second["bytes_hex"])
    assert lead == b"\xc3" and first["text"] == "\ufffd"  # 'é' begun, not finished: the byte is kept
    assert cont == b"\xa9" and second["text"] == "\ufffd"  # and finished after the cut prompt
    assert (lead + cont).decode() == "é"
