"""The worked example of docs/architecture.md, run from the page itself: the new proposer is
registered, built by the registry, and proven lossless like every other method (greedy output
equals plain greedy on a ragged batch; sampled output passes the chi-square test against the
exact target distribution)."""

import re
from pathlib import Path

import numpy as np
import pytest

from tokax import testing as T
from tokax.decode import methods
from tokax.decode.generate import Generator

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


@pytest.fixture(scope="module")
def example():
    text = DOC.read_text()
    code = re.search(r"## Adding a decoding method.*?```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) < 50  # "a new proposer in under 50 lines"
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    try:
        yield namespace
    finally:
        methods.METHODS.pop("history_bigram", None)  # the registry as the other tests know it


@pytest.fixture(scope="module")
def gen(example):
    cfg, params = T.tiny_target()
    assert "history_bigram" in methods.METHODS
    return methods.make_generator("history_bigram", methods.default_block("history_bigram"), cfg, params, eos_ids=())


def test_example_greedy_equals_plain_greedy(gen):
    cfg, params = T.tiny_target()
    base, budgets = T.ragged_prompts()
    want = Generator(cfg, params, eos_ids=()).generate(base, budgets)
    outs, st = gen.generate(base * 64, budgets * 64)
    assert all(row == want[i % len(base)] for i, row in enumerate(outs))
    accepted = np.array([s["accepted"] for s in st[: len(base)]])
    assert accepted.sum() > 0 and len(set(accepted.tolist())) > 1  # it drafts, and rows advance raggedly


def test_example_sampling_matches_target_distribution(gen):
    cfg, params = T.tiny_target()
    sp = T.sampling_params()
    exact = T.exact_target_distribution(cfg, params, T.SAMPLE_PROMPT, T.N_SAMPLED, sp)
    codes, st = T.sampled_codes(gen, range(4), sp)
    assert 0 < sum(s["accepted"] for s in st) < sum(s["proposed"] for s in st)
    assert T.chi2_pvalue(codes, exact) > 0.01
