"""The decoder with attention_impl='ring' against the reference decoder.

The 8-device checks run this file as a script in a subprocess (XLA_FLAGS
must be set before jax is imported; the pytest process keeps one device):

    python tests/model/test_ring_decoder.py OUT.json [CASE ...]

It writes raw numbers as JSON; the tests below hold the assertions. The
reference is `forward` with attention_impl='reference' (the einsum oracle
with a dense mask) on the same tokens in natural order. The ring runs put
tokens, positions and segment ids into a sequence layout with `to_layout`,
run `forward` under `jax.set_mesh(mesh)` and return the logits to natural
order with `from_layout`.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # the 8-device worker: set the flags before jax is imported
    # Compiling dominates these tiny programs: skip XLA's slow CPU backend passes.
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (
        " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
        " --xla_llvm_disable_expensive_passes=true")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import json  # noqa: E402
import subprocess  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AxisType, PartitionSpec as P  # noqa: E402

from tokax.kernels.ring_attention import from_layout, to_layout  # noqa: E402
from tokax.model import kv_cache as kvc  # noqa: E402
from tokax.model.attention import attend, sequence_parallel_size  # noqa: E402
from tokax.model.config import tiny  # noqa: E402
from tokax.model.decoder import forward, init_params  # noqa: E402

HERE = os.path.abspath(__file__)
CFG = tiny(vocab_size=64)  # layer 0: local, window 8; layer 1: global; 4 query heads on 2 KV heads
RING = CFG.replace(attention_impl="ring")
T = 32
# (case name, mesh axis sizes in (data, fsdp, tensor, sequence) order, layout)
CASES = {
    "sequence8_plain": ((1, 1, 1, 8), "plain"),
    "sequence8_zigzag": ((1, 1, 1, 8), "zigzag"),
    "sequence8_striped": ((1, 1, 1, 8), "striped"),
    "data2_tensor2_sequence2_zigzag": ((2, 1, 2, 2), "zigzag"),
}


def _mesh(sizes: tuple[int, ...]) -> jax.sharding.Mesh:
    n = int(np.prod(sizes))
    return jax.make_mesh(sizes, ("data", "fsdp", "tensor", "sequence"), axis_types=(AxisType.Auto,) * 4,
                         devices=jax.devices()[:n])


def packed_inputs(rng: np.random.Generator, b: int = 2):
    """``[b, T]`` tokens, positions, segment ids: documents of 13, 11, 8 tokens; 19, 7 + 6 padding."""
    docs = [(13, 11, 8), (19, 7)]
    pos = np.full((b, T), -1, np.int32)
    seg = np.zeros((b, T), np.int32)
    for r in range(b):
        start = 0
        for s, n in enumerate(docs[r % len(docs)]):
            pos[r, start:start + n] = np.arange(n)
            seg[r, start:start + n] = s + 1
            start += n
    return rng.integers(0, CFG.vocab_size, (b, T)).astype(np.int32), pos, seg


def _logits(cfg):
    return jax.jit(lambda p, t, q, s: forward(cfg, p, t, q, segment_ids=s)[0])


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def worker(out_path: str, names: list[str]) -> None:
    assert len(jax.devices()) == 8, jax.devices()
    params = jax.jit(lambda r: init_params(CFG, r))(jax.random.PRNGKey(0))
    tok, pos, seg = packed_inputs(np.random.default_rng(0))
    ref = np.asarray(_logits(CFG)(params, tok, pos, seg))  # [B, T, V]
    res: dict = {"no_window_rel_diff": _rel(_logits(CFG.replace(sliding_window=None))(params, tok, pos, seg), ref)}
    for name in names:
        sizes, layout = CASES[name]
        mesh = _mesh(sizes)
        n = mesh.shape["sequence"]
        args = [to_layout(x, n, layout) for x in (tok, pos, seg)]
        f = _logits(RING)
        with jax.set_mesh(mesh):
            compiled = f.lower(params, *args).compile()
            seen = sequence_parallel_size()
        out = from_layout(np.asarray(compiled(params, *args)), n, layout)
        # ring_attention names its K/V transfers 'ring_kv' (jax.named_scope in the HLO metadata)
        res[name] = {"rel_diff": _rel(out, ref), "ring_in_hlo": "ring_kv" in compiled.as_text(), "seen_n": seen}

    mesh = _mesh((1, 1, 1, 8))
    # The caller's own shard_map over `sequence` (tokens already local): the kernel runs per shard.
    tp = P(None, "sequence")
    g = jax.jit(jax.shard_map(lambda p, t, q, s: forward(RING, p, t, q, segment_ids=s)[0], mesh=mesh,
                              in_specs=(P(), tp, tp, tp), out_specs=tp))
    out = g(params, tok, pos, seg)
    res["manual_shard_map"] = {"rel_diff": _rel(out, ref), "ring_in_hlo": "ring_kv" in g.lower(params, tok, pos, seg).compile().as_text()}

    # A length the sequence axis does not divide fails loudly.
    try:
        with jax.set_mesh(mesh):
            _logits(RING)(params, tok[:, :28], pos[:, :28], seg[:, :28])
        res["indivisible_error"] = None
    except ValueError as e:
        res["indivisible_error"] = str(e)

    # Cached decoding under a ring config is the reference path (the cache is not sequence parallel).
    prompt, step_tok = tok[:1, :12], tok[:1, 12:13]

    def decode(cfg, p):
        cache = kvc.init_cache(cfg, 1, 16)
        _, _, cache = forward(cfg, p, prompt, jnp.arange(12)[None], cache)
        return forward(cfg, p, step_tok, jnp.full((1, 1), 12), cache)[0]

    with jax.set_mesh(mesh):
        dec = jax.jit(lambda p: decode(RING, p))
        dec_out = dec(params)
        dec_ring = "ring_kv" in dec.lower(params).compile().as_text()
    res["decode"] = {"rel_diff": _rel(dec_out, jax.jit(lambda p: decode(CFG, p))(params)), "ring_in_hlo": dec_ring}
    with open(out_path, "w") as f:
        json.dump(res, f)


# ----------------------------------------------------------------------------
# tests (pytest process, one device)


def _run_worker(tmp_path, names) -> dict:
    out = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, HERE, str(out), *names], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _run_worker(tmp_path_factory.mktemp("ring_decoder"), list(CASES))


def _check_case(r, name):
    assert r["ring_in_hlo"] and r["seen_n"] == CASES[name][0][3], (name, r)  # really ran ring attention
    assert r["rel_diff"] < 1e-5, (name, r["rel_diff"])


@pytest.mark.parametrize("name", list(CASES))
def test_ring_logits_match_reference(results, name):
    # the window matters on these inputs, so matching means the ring path honours it
    assert results["no_window_rel_diff"] > 1e-2
    _check_case(results[name], name)


def test_ring_inside_callers_shard_map(results):
    r = results["manual_shard_map"]
    assert r["ring_in_hlo"] and r["rel_diff"] < 1e-5, r


def test_ring_indivisible_length_fails_loudly(results):
    msg = results["indivisible_error"]
    assert msg is not None and "28" in msg and "divisible" in msg and "'sequence'" in msg, msg


def test_ring_config_decodes_with_reference_path(results):
    r = results["decode"]
    assert not r["ring_in_hlo"] and r["rel_diff"] < 1e-6, r


def test_ring_without_sequence_axis_is_reference():
    """No mesh, or a mesh whose `sequence` axis has size 1: 'ring' is the reference path."""
    params = jax.jit(lambda r: init_params(CFG, r))(jax.random.PRNGKey(1))
    tok, pos, seg = packed_inputs(np.random.default_rng(1))
    ref = np.asarray(_logits(CFG)(params, tok, pos, seg))
    assert sequence_parallel_size() == 1
    np.testing.assert_allclose(_logits(RING)(params, tok, pos, seg), ref, rtol=1e-6, atol=1e-6)
    with jax.set_mesh(_mesh((1, 1, 1, 1))):
        assert sequence_parallel_size() == 1
        np.testing.assert_allclose(_logits(RING)(params, tok, pos, seg), ref, rtol=1e-6, atol=1e-6)


def test_ring_rejects_token_tree_mask():
    q = jnp.zeros((1, 4, 2, 8))
    pos = jnp.arange(4)[None]
    with pytest.raises(ValueError, match="extra"):
        attend("ring", q, q, q, 1.0, pos, pos, None, extra_mask=jnp.ones((1, 4, 4), bool))


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2:])
