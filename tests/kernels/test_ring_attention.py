"""Ring attention / TokenRing against full attention.

The multi-device checks run `ring_attention_check.py` in subprocesses with
8 simulated CPU devices (XLA_FLAGS must be set before jax is imported, and
this pytest process must keep seeing one device). The script computes the
kernel and an independent full-attention reference and reports max errors
and per-device work counters; the assertions live here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokax.kernels.ring_attention import (
    comm_bytes_per_step,
    from_layout,
    inverse_layout_permutation,
    layout_permutation,
    ring_attention,
    to_layout,
)

HERE = Path(__file__).parent
SCRIPT = HERE / "ring_attention_check.py"
DEVICES = 8
TOL = 1e-5  # float32, absolute, on outputs and gradients

_spec = importlib.util.spec_from_file_location("ring_attention_check", SCRIPT)
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)  # defines the case lists; sets no env when imported


def _run_suite(suite: str, shards: int) -> dict:
    """Run the check script's cases split over `shards` concurrent processes."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), "--suite", suite, "--devices", str(DEVICES),
             "--shard", str(i), "--num-shards", str(shards)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for i in range(shards)
    ]
    merged: dict = {"cases": {}}
    for p in procs:
        out, err = p.communicate(timeout=1200)
        assert p.returncode == 0, f"ring_attention_check.py failed:\n{err[-4000:]}"
        result = json.loads(out.strip().splitlines()[-1])
        assert result["devices"] == DEVICES
        merged["cases"].update(result["cases"])
    return merged


@pytest.fixture(scope="module")
def default_results() -> dict:
    # Two processes: compilation is single-threaded, the CI machine has 2 cores.
    return _run_suite("default", shards=2)["cases"]


def _assert_close(name: str, r: dict) -> None:
    assert r["finite"], name
    for key in ("out_err", "dq_err", "dk_err", "dv_err", "global_out_err"):
        if key in r:
            assert r[key] < TOL, f"{name}: {key}={r[key]:.3g} >= {TOL}"


@pytest.mark.parametrize("name", check.case_names("default"))
def test_matches_full_attention(default_results, name):
    _assert_close(name, default_results[name])


def test_unmasked_pair_counts_match_brute_force(default_results):
    # The kernel's own counters of unmasked (q, k) pairs per device equal a
    # numpy enumeration of the mask over the layout (query owner for ring,
    # key owner for TokenRing).
    for name, r in default_results.items():
        if "stats" in r:
            assert r["stats"]["unmasked_pairs"] == r["expected_unmasked"], name


def _spread(xs) -> float:
    return max(xs) / min(xs)


@pytest.mark.parametrize("name", ["striped-tokenring-causal-2k", "zigzag-ring-causal-2k"])
def test_balanced_layouts_do_equal_work(default_results, name):
    r = default_results[name]
    assert _spread(r["stats"]["computed_pairs"]) <= 1.10, r["stats"]
    assert _spread(r["stats"]["unmasked_pairs"]) <= 1.10, r["stats"]
    plain = default_results["plain-ring-causal-2k"]["stats"]
    # The plain layout under a causal mask: device 0 needs one diagonal block,
    # device n-1 all n blocks.
    assert _spread(plain["unmasked_pairs"]) > 5
    assert _spread(plain["computed_pairs"]) > 5
    # Skipping fully masked chunk pairs: the balanced layouts compute at most
    # ~(1/2 + 1/n) of all pairs, and nobody computes more than plain's maximum.
    seq, n = 2048, DEVICES
    assert max(r["stats"]["computed_pairs"]) < 0.7 * seq * seq / n
    assert max(r["stats"]["computed_pairs"]) < max(plain["computed_pairs"])


@pytest.mark.parametrize("impl", ["ring", "tokenring"])
def test_hlo_permute_bytes_match_formula(default_results, impl):
    # Bytes per step read from the compiled fwd+bwd program's collective-permute
    # shapes against comm_bytes_per_step (float32, batch 2, 4/1 heads, dim 16).
    r = default_results[f"plain-{impl}-noncausal-window-gqa"]
    n, batch, seq, heads, kv_heads, dim = DEVICES, 2, 512, 4, 1, 16
    local = seq // n
    kw = dict(block_len=local, batch=batch, heads=heads, kv_heads=kv_heads, head_dim=dim, itemsize=4, impl=impl)
    fwd, bwd = comm_bytes_per_step(**kw), comm_bytes_per_step(backward=True, **kw)
    got = r["permute_bytes"]  # stream -> bytes of each step's transfer
    positions = 4 * local  # int32 positions travel with the block
    if impl == "ring":
        assert got["ring_kv"] == [fwd["forward"] + positions]  # one step in the while body
        assert got["ring_kv_bwd"] == [fwd["forward"] + positions]
        assert got["ring_dkv"] == [bwd["forward"] - fwd["forward"]]
        assert got["ring_dkv_home"] == [bwd["forward"] - fwd["forward"]]
    else:
        assert got["tokenring_q"] == [fwd["forward"] + positions]
        assert got["tokenring_q_bwd"] == [bwd["forward"] + positions]
        # One return per offset 1..n-1 (switch branches; the peeled last step
        # adds duplicates), all of one step's size.
        assert len(got["tokenring_out"]) >= n - 1 and set(got["tokenring_out"]) == {fwd["return"]}
        assert len(got["tokenring_dq"]) >= n - 1 and set(got["tokenring_dq"]) == {bwd["return"]}


def test_plain_layout_skips_masked_blocks(default_results):
    # With a window the plain layout skips every chunk pair outside the band.
    r = default_results["plain-ring-causal-window-2k"]
    seq, n, block = 2048, DEVICES, r["block"]
    local = seq // n
    total_blocks = (local // block) * (seq // block)
    assert max(r["stats"]["computed_blocks"]) < 0.25 * total_blocks
    # Computed work covers all the unmasked pairs (nothing was skipped wrongly).
    assert all(c >= u for c, u in zip(r["stats"]["computed_pairs"], r["stats"]["unmasked_pairs"]))


@pytest.mark.slow
def test_16k_tokens_match_full_attention():
    results = _run_suite("long", shards=1)["cases"]
    assert set(results) == set(check.case_names("long"))
    for name, r in results.items():
        _assert_close(name, r)
        assert _spread(r["stats"]["computed_pairs"]) <= 1.10, (name, r["stats"])


# ---------------------------------------------------------------------------
# Single-process tests (one device)


@pytest.mark.parametrize("layout", ["plain", "striped", "zigzag"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_layout_permutation(layout, n):
    seq = 64
    perm = layout_permutation(seq, n, layout)
    inv = inverse_layout_permutation(seq, n, layout)
    assert sorted(perm.tolist()) == list(range(seq))
    np.testing.assert_array_equal(perm[inv], np.arange(seq))
    per = seq // n
    for d in range(n):
        tokens = perm[d * per : (d + 1) * per]
        if layout == "plain":
            expected = list(range(d * per, (d + 1) * per))
        elif layout == "striped":
            expected = [i for i in range(seq) if i % n == d]
        else:
            c = seq // (2 * n)
            expected = list(range(d * c, (d + 1) * c)) + list(range((2 * n - 1 - d) * c, (2 * n - d) * c))
        assert tokens.tolist() == expected


def test_to_and_from_layout_round_trip():
    x = np.arange(2 * 32 * 3).reshape(2, 32, 3)
    for layout in ("plain", "striped", "zigzag"):
        y = to_layout(x, 4, layout)
        np.testing.assert_array_equal(y[:, :, 0] // 3 % 32, np.broadcast_to(layout_permutation(32, 4, layout), (2, 32)))
        np.testing.assert_array_equal(from_layout(y, 4, layout), x)
        np.testing.assert_array_equal(np.asarray(from_layout(to_layout(jnp.asarray(x), 4, layout), 4, layout)), x)


def test_layout_errors_name_the_fix():
    with pytest.raises(ValueError, match="divisible by 16"):
        layout_permutation(40, 8, "zigzag")
    with pytest.raises(ValueError, match="layout='diagonal'"):
        layout_permutation(64, 8, "diagonal")


def _full_attention(q, k, v, *, causal, window):
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    i, j = np.arange(q.shape[1])[:, None], np.arange(q.shape[1])[None, :]
    allowed = np.ones_like(s[0, 0], bool)
    if causal:
        allowed &= j <= i
    if window:
        allowed &= i - j < window
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("impl", ["ring", "tokenring"])
def test_single_device_mesh(impl):
    # n = 1: no communication, only the chunked online softmax and skipping.
    mesh = jax.make_mesh((1,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, 96, 4, 8)).astype(np.float32)
    k = rng.normal(size=(1, 96, 2, 8)).astype(np.float32)
    v = rng.normal(size=(1, 96, 2, 8)).astype(np.float32)
    out = ring_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mesh=mesh, impl=impl, window=20,
                         block_size=16)
    np.testing.assert_allclose(np.asarray(out), _full_attention(q, k, v, causal=True, window=20), atol=TOL)


def test_comm_bytes_formula():
    # Block of 1024 tokens, batch 2, 8 q heads, 2 kv heads, head_dim 64, bf16.
    kw = dict(block_len=1024, batch=2, heads=8, kv_heads=2, head_dim=64, itemsize=2)
    tokens = 2 * 1024
    assert comm_bytes_per_step(impl="ring", **kw) == {"forward": tokens * 2 * 2 * 64 * 2, "return": 0}
    assert comm_bytes_per_step(impl="ring", backward=True, **kw) == {
        "forward": tokens * 2 * 2 * 64 * (2 + 4), "return": 0}
    assert comm_bytes_per_step(impl="tokenring", **kw) == {
        "forward": tokens * 8 * 64 * 2, "return": tokens * 8 * (64 * 2 + 4)}
    assert comm_bytes_per_step(impl="tokenring", backward=True, **kw) == {
        "forward": tokens * 8 * (2 * 64 * 2 + 2 * 4), "return": tokens * 8 * 64 * 4}
