"""Multi-device checks for ring attention, run in a subprocess.

`XLA_FLAGS=--xla_force_host_platform_device_count=N` must be set before jax
is imported, and the rest of the pytest process must keep seeing one
device, so tests/kernels/test_ring_attention.py runs this script with
`python ring_attention_check.py --suite NAME` and reads one JSON object
from the last line of stdout:

    {"devices": N, "cases": {name: {"out_err": ..., "dq_err": ..., ...,
                                    "stats": {...}, "expected_unmasked": [...]}}}

Errors are max |ring - reference| over the output and the gradients of
sum(out * cotangent); the reference is plain full attention written here
(einsum, float32 softmax over the whole row), independent of the kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="default", choices=["default", "long", "smoke"])
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--shard", type=int, default=0, help="run every num-shards-th case starting here")
    ap.add_argument("--num-shards", type=int, default=1)
    return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tokax.kernels.ring_attention import hlo_permute_bytes, layout_permutation, ring_attention  # noqa: E402


def reference_attention(q, k, v, *, causal, window, segment_ids, scale, q_chunk):
    """Full softmax attention in natural order, query rows in chunks of q_chunk
    (each chunk sees the whole key sequence; the chunking only bounds memory)."""
    b, s, h, d = q.shape
    g = h // k.shape[2]
    kf = jnp.repeat(k, g, axis=2).astype(jnp.float32)
    vf = jnp.repeat(v, g, axis=2).astype(jnp.float32)
    kpos = jnp.arange(s)

    @jax.checkpoint
    def rows(args):
        qc, start = args  # qc [B, C, H, D]
        qpos = start + jnp.arange(qc.shape[1])
        scores = jnp.einsum("bqhd,bkhd->bhqk", qc.astype(jnp.float32), kf) * scale
        allowed = jnp.ones((qc.shape[1], s), bool)
        if causal:
            allowed &= kpos[None, :] <= qpos[:, None]
        if window is not None:
            allowed &= qpos[:, None] - kpos[None, :] < window
            if not causal:
                allowed &= kpos[None, :] - qpos[:, None] < window
        allowed = jnp.broadcast_to(allowed, (b, qc.shape[1], s))
        if segment_ids is not None:
            qseg = jax.lax.dynamic_slice_in_dim(segment_ids, start, qc.shape[1], axis=1)
            allowed = allowed & (qseg[:, :, None] == segment_ids[:, None, :])
        scores = jnp.where(allowed[:, None], scores, -jnp.inf)
        mx = jnp.max(scores, axis=-1, keepdims=True)
        mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
        w = jnp.exp(scores - mx)
        den = w.sum(-1, keepdims=True)
        p = w / jnp.where(den > 0, den, 1.0)
        return jnp.einsum("bhqk,bkhd->bqhd", p, vf)

    nc = s // q_chunk
    qs = q.reshape(b, nc, q_chunk, h, d).transpose(1, 0, 2, 3, 4)
    out = jax.lax.map(rows, (qs, jnp.arange(nc) * q_chunk))
    return out.transpose(1, 0, 2, 3, 4).reshape(b, s, h, d).astype(q.dtype)


def expected_unmasked(perm, n, *, batch, causal, window, segment_ids, impl) -> list[int]:
    """Brute-force count of allowed (q, k) pairs per device (summed over batch).

    Ring attention computes a pair on the device that owns the query,
    TokenRing on the device that owns the key.
    """
    s = perm.shape[0]
    per = s // n
    i = np.arange(s)[:, None]
    j = np.arange(s)[None, :]
    allowed = np.ones((s, s), bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= i - j < window
        if not causal:
            allowed &= j - i < window
    segs = np.zeros((batch, s), int) if segment_ids is None else np.asarray(segment_ids)
    counts = np.zeros(n, np.int64)
    for row in segs:
        a = allowed & (row[:, None] == row[None, :])
        per_token = (a.sum(1) if impl == "ring" else a.sum(0))[perm]  # in layout order
        counts += per_token.reshape(n, per).sum(1)
    return counts.tolist()


def run_case(mesh, *, seq, batch, heads, kv_heads, dim, layout, impl, causal, window, segments, block, seed):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(batch, seq, heads, dim)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(batch, seq, kv_heads, dim)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(batch, seq, kv_heads, dim)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=(batch, seq, heads, dim)), jnp.float32)
    seg = None
    if segments:
        # Packed documents of random lengths; different per batch row.
        seg = np.cumsum(rng.random((batch, seq)) < 3.0 / seq, axis=1).astype(np.int32)
        seg = jnp.asarray(seg)
    scale = dim**-0.5
    kw = dict(causal=causal, window=window, segment_ids=seg)

    def ring_fn(q, k, v):
        out, stats = ring_attention(
            q, k, v, mesh=mesh, layout=layout, impl=impl, block_size=block, return_stats=True, **kw
        )
        return out, stats

    def ref_fn(q, k, v):
        return reference_attention(q, k, v, scale=scale, q_chunk=min(seq, 512), **kw)

    @jax.jit
    def ring_out_and_grads(q, k, v):
        out, pullback, stats = jax.vjp(ring_fn, q, k, v, has_aux=True)
        return out, pullback(ct), stats

    @jax.jit
    def ref_out_and_grads(q, k, v):
        out, pullback = jax.vjp(ref_fn, q, k, v)
        return out, pullback(ct)

    t0 = time.time()
    compiled = ring_out_and_grads.lower(q, k, v).compile()
    out, grads, stats = compiled(q, k, v)
    ref_out, ref_grads = ref_out_and_grads(q, k, v)
    n = mesh.shape["sequence"]
    perm = layout_permutation(seq, n, layout)

    def err(a, b):
        return float(jnp.max(jnp.abs(a - b)))

    return {
        "out_err": err(out, ref_out),
        "dq_err": err(grads[0], ref_grads[0]),
        "dk_err": err(grads[1], ref_grads[1]),
        "dv_err": err(grads[2], ref_grads[2]),
        "out_scale": float(jnp.max(jnp.abs(ref_out))),
        "grad_scale": max(float(jnp.max(jnp.abs(g))) for g in ref_grads),
        "finite": bool(all(bool(jnp.all(jnp.isfinite(x))) for x in (out, *grads))),
        "stats": {name: np.asarray(val).tolist() for name, val in stats.items()},
        "expected_unmasked": expected_unmasked(
            perm, n, batch=batch, causal=causal, window=window, segment_ids=seg, impl=impl
        ),
        "permute_bytes": hlo_permute_bytes(compiled.as_text()),
        "block": block,
        "local": seq // n,
        "seconds": time.time() - t0,
    }


def run_shard_entry_case(n: int, seed: int) -> dict:
    """`ring_attention_shard` called from the caller's own shard_map (as the
    model will), with per-row [B, L] positions from the zigzag permutation,
    on a mesh with Explicit axis types; compared with the reference."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from tokax.kernels.ring_attention import ring_attention_shard

    mesh = jax.make_mesh((n,), ("sequence",), axis_types=(jax.sharding.AxisType.Explicit,))
    batch, seq, heads, kv_heads, dim = 2, 256, 4, 2, 8
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(batch, seq, heads, dim)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(batch, seq, kv_heads, dim)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(batch, seq, kv_heads, dim)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=(batch, seq, heads, dim)), jnp.float32)
    perm = layout_permutation(seq, n, "zigzag")
    pos = jnp.asarray(np.broadcast_to(perm, (batch, seq)), jnp.int32)  # [B, S] in layout order
    act = NamedSharding(mesh, P(None, "sequence", None, None))
    qp, kp, vp = (jax.sharding.reshard(x[:, perm], act) for x in (q, k, v))
    pos = jax.sharding.reshard(pos, NamedSharding(mesh, P(None, "sequence")))

    def model_attention(q, k, v, pos):
        return ring_attention_shard(q, k, v, pos, pos, axis_name="sequence", causal=True, impl="tokenring",
                                    block_size=8)

    sharded = jax.shard_map(model_attention, mesh=mesh, in_specs=(act.spec,) * 3 + (P(None, "sequence"),),
                            out_specs=act.spec)

    @jax.jit
    def ring_out_and_grads(q, k, v):
        out, pullback = jax.vjp(lambda q, k, v: sharded(q, k, v, pos), q, k, v)
        return out, pullback(jax.sharding.reshard(ct[:, perm], act))

    out, grads = ring_out_and_grads(qp, kp, vp)
    inv = np.argsort(perm)
    ref = lambda q, k, v: reference_attention(  # noqa: E731
        q, k, v, causal=True, window=None, segment_ids=None, scale=dim**-0.5, q_chunk=seq)
    ref_out, pullback = jax.vjp(ref, q, k, v)
    ref_grads = pullback(ct)

    def err(a, b):
        return float(np.max(np.abs(np.asarray(a)[:, inv] - np.asarray(b))))

    # The global entry point on the same Explicit mesh (it reshards its inputs).
    glob = jax.jit(lambda q, k, v: ring_attention(q, k, v, mesh=mesh, layout="striped", impl="ring", block_size=8))
    return {
        "global_out_err": float(np.max(np.abs(np.asarray(glob(q, k, v)) - np.asarray(ref_out)))),
        "out_err": err(out, ref_out),
        "dq_err": err(grads[0], ref_grads[0]),
        "dk_err": err(grads[1], ref_grads[1]),
        "dv_err": err(grads[2], ref_grads[2]),
        "finite": True,
    }


def cases(suite: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    if suite == "smoke":
        out["smoke"] = dict(seq=128, batch=1, heads=2, kv_heads=1, dim=8, layout="zigzag", impl="tokenring",
                            causal=True, window=None, segments=True, block=8)
        return out
    if suite == "long":
        for layout, impl in (("zigzag", "ring"), ("striped", "tokenring")):
            out[f"long-{layout}-{impl}"] = dict(seq=16384, batch=1, heads=2, kv_heads=1, dim=8, layout=layout,
                                                impl=impl, causal=True, window=None, segments=False, block=1024)
        return out
    variants = {
        # name: (causal, window, segments, heads, kv_heads)
        "causal-seg-gqa": (True, None, True, 4, 2),
        "noncausal-window-gqa": (False, 96, False, 4, 1),
    }
    for layout in ("plain", "striped", "zigzag"):
        for impl in ("ring", "tokenring"):
            for name, (causal, window, segments, h, kvh) in variants.items():
                out[f"{layout}-{impl}-{name}"] = dict(
                    seq=512, batch=2, heads=h, kv_heads=kvh, dim=16, layout=layout, impl=impl,
                    causal=causal, window=window, segments=segments, block=16,
                )
    # 2k tokens, causal, window: the balance numbers are read from these.
    for layout, impl in (("plain", "ring"), ("striped", "tokenring"), ("zigzag", "ring")):
        out[f"{layout}-{impl}-causal-2k"] = dict(seq=2048, batch=1, heads=2, kv_heads=1, dim=8, layout=layout,
                                                 impl=impl, causal=True, window=None, segments=False, block=64)
    out["plain-ring-causal-window-2k"] = dict(seq=2048, batch=1, heads=2, kv_heads=1, dim=8, layout="plain",
                                              impl="ring", causal=True, window=300, segments=False, block=64)
    return out


def case_names(suite: str) -> list[str]:
    """All case names of a suite, in run order (the tests parametrize over these)."""
    names = list(cases(suite))
    return names + ["shard-entry-explicit-mesh"] if suite == "default" else names


def main() -> None:
    jax.config.update("jax_default_matmul_precision", "highest")  # only in this subprocess
    n = ARGS.devices
    mesh = jax.make_mesh((n,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,))
    results = {}
    names = case_names(ARGS.suite)
    for i, name in enumerate(names):
        if i % ARGS.num_shards != ARGS.shard:
            continue
        if name == "shard-entry-explicit-mesh":
            results[name] = run_shard_entry_case(n, seed=i)
        else:
            results[name] = run_case(mesh, seed=i, **cases(ARGS.suite)[name])
        print(name, {k: v for k, v in results[name].items() if k.endswith("err") or k == "seconds"},
              file=sys.stderr, flush=True)
    print(json.dumps({"devices": len(jax.devices()), "cases": results}))


if __name__ == "__main__":
    main()
