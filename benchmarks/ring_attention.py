"""Ring attention / TokenRing on a simulated CPU mesh: memory, balance, communication.

    python benchmarks/ring_attention.py [--quick] [--out FILE.md]
    python benchmarks/ring_attention.py --smoke   # smallest run: one length, 1 and 8 devices (a check that it runs)

Runs with XLA_FLAGS=--xla_force_host_platform_device_count=8 (set here
before jax is imported) and prints three markdown tables:

1. Memory. Per-device bytes from `jax.jit(...).lower(...).compile()
   .memory_analysis()` (temp = scratch, args = this device's inputs, out =
   outputs) of the per-shard kernel under shard_map, forward and
   forward+backward, for n = 1, 2, 4, 8 devices and a range of sequence
   lengths; then the longest sequence whose forward+backward fits a
   per-device budget, against the number of devices. Inputs arrive already
   in the layout (as the data pipeline will deliver them), so the layout
   gather is not counted.
2. Balance. Per-device (q, k) pairs computed (chunk pairs not skipped) and
   unmasked, causal mask, for the plain, striped and zigzag layouts.
3. Communication. Bytes per collective-permute read from the compiled HLO
   (shapes and source-target pairs), grouped by direction, per ring step,
   for ring and TokenRing, forward and forward+backward, next to the formula
   of `comm_bytes_per_step`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from tokax.kernels.ring_attention import (  # noqa: E402
    comm_bytes_per_step,
    hlo_permute_bytes,
    ring_attention,
    ring_attention_shard,
)

MiB = 2**20
ACT = P(None, "sequence", None, None)


def mesh_of(n: int) -> jax.sharding.Mesh:
    return jax.make_mesh((n,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:n])


def sharded_kernel(mesh, *, impl, causal=True, block_size=512):
    def per_shard(q, k, v, pos):
        return ring_attention_shard(q, k, v, pos, pos, axis_name="sequence", causal=causal, impl=impl,
                                    block_size=block_size)

    return jax.shard_map(per_shard, mesh=mesh, in_specs=(ACT, ACT, ACT, P("sequence")), out_specs=ACT)


def abstract_inputs(mesh, *, batch, seq, heads, kv_heads, dim, dtype=jnp.float32):
    act = NamedSharding(mesh, ACT)
    return (
        jax.ShapeDtypeStruct((batch, seq, heads, dim), dtype, sharding=act),
        jax.ShapeDtypeStruct((batch, seq, kv_heads, dim), dtype, sharding=act),
        jax.ShapeDtypeStruct((batch, seq, kv_heads, dim), dtype, sharding=act),
        jax.ShapeDtypeStruct((seq,), jnp.int32, sharding=NamedSharding(mesh, P("sequence"))),
    )


def compile_fwd_bwd(mesh, shapes, *, impl, backward: bool, dtype=jnp.float32):
    f = sharded_kernel(mesh, impl=impl)
    if backward:
        def g(q, k, v, pos):
            return jax.grad(lambda q, k, v: jnp.sum(f(q, k, v, pos)), argnums=(0, 1, 2))(q, k, v)
    else:
        g = f
    return jax.jit(g).lower(*abstract_inputs(mesh, dtype=dtype, **shapes)).compile()


def reference_full(q, k, v):
    """Single-device full attention (materialises the [S, S] scores): the baseline."""
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, 2), jnp.repeat(v, g, 2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)


def memory_table(quick: bool, smoke: bool = False) -> str:
    shapes = dict(batch=1, heads=8, kv_heads=2, dim=64)
    seqs = [4096, 16384, 65536] if quick else [4096, 8192, 16384, 32768, 65536, 131072, 262144]
    devices = (1, 2, 4, 8)
    if smoke:
        seqs, devices = [2048], (1, 8)
    budget = 128 * MiB
    rows = []
    fits: dict[tuple[str, int], int] = {}
    for impl in ("ring", "tokenring"):
        for n in devices:
            mesh = mesh_of(n)
            for seq in seqs:
                if seq // n > 65536:  # keep single-device compiles reasonable
                    continue
                row = [impl, n, seq, seq // n]
                for backward in (False, True):
                    ma = compile_fwd_bwd(mesh, dict(shapes, seq=seq), impl=impl, backward=backward).memory_analysis()
                    total = ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
                    row += [ma.temp_size_in_bytes / MiB, ma.argument_size_in_bytes / MiB, total / MiB]
                    if backward and total <= budget:
                        fits[(impl, n)] = max(fits.get((impl, n), 0), seq)
                rows.append(row)
                print("memory", row, file=sys.stderr, flush=True)
    ref_rows = []
    for seq in [1024] if smoke else [1024, 2048, 4096, 8192]:
        sds = [jax.ShapeDtypeStruct((1, seq, h, 64), jnp.float32) for h in (8, 2, 2)]
        fwd = jax.jit(reference_full).lower(*sds).compile().memory_analysis()
        bwd = jax.jit(jax.grad(lambda q, k, v: jnp.sum(reference_full(q, k, v)), argnums=(0, 1, 2)))
        bwd = bwd.lower(*sds).compile().memory_analysis()
        ref_rows.append([seq, fwd.temp_size_in_bytes / MiB, bwd.temp_size_in_bytes / MiB])
    out = [
        f"### Per-device memory (float32, batch 1, 8 q heads, 2 kv heads, head_dim 64, causal, block 512)\n",
        "| impl | devices | seq | per device | fwd temp MiB | fwd args MiB | fwd total MiB "
        "| fwd+bwd temp MiB | fwd+bwd args MiB | fwd+bwd total MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append("| " + " | ".join([str(r[0]), str(r[1]), str(r[2]), str(r[3])] + [f"{x:.1f}" for x in r[4:]]) + " |")
    out += [
        "",
        f"Longest sequence (from the lengths above) whose forward+backward total fits {budget // MiB} MiB per device:",
        "",
        "| impl | " + " | ".join(str(n) for n in devices) + " |",
        "|---|" + "---:|" * len(devices),
    ]
    for impl in ("ring", "tokenring"):
        out.append(f"| {impl} | " + " | ".join(str(fits.get((impl, n), "-")) for n in devices) + " |")
    out += [
        "",
        "Baseline: single-device full attention (materialises the scores), temp MiB:",
        "",
        "| seq | fwd temp MiB | fwd+bwd temp MiB |",
        "|---:|---:|---:|",
    ]
    for seq, f, b in ref_rows:
        out.append(f"| {seq} | {f:.1f} | {b:.1f} |")
    return "\n".join(out)


def balance_table(seq: int) -> str:
    mesh = mesh_of(8)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, seq, 1, 8)), jnp.float32)
    out = [
        f"### Per-device work, causal, {seq} tokens on 8 devices, chunk {seq // 16} "
        "(computed = (q, k) pairs in chunk pairs not skipped; unmasked = pairs the mask allows)\n",
        "| layout | impl | computed pairs per device | max/min computed | max/min unmasked "
        "| max computed / (S^2 / 2n) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for layout in ("plain", "striped", "zigzag"):
        for impl in ("ring", "tokenring"):
            _, stats = jax.jit(lambda q: ring_attention(q, q, q, mesh=mesh, layout=layout, impl=impl,
                                                        block_size=seq // 16, return_stats=True))(q)
            comp = np.asarray(stats["computed_pairs"])
            unm = np.asarray(stats["unmasked_pairs"])
            ideal = seq * seq / 2 / 8
            out.append(
                f"| {layout} | {impl} | {' '.join(str(int(c)) for c in comp)} | {comp.max() / comp.min():.2f} "
                f"| {unm.max() / unm.min():.2f} | {comp.max() / ideal:.2f} |"
            )
    return "\n".join(out)


_PASS_STREAMS = {
    ("ring", "fwd"): {"ring_kv": "forward"},
    ("ring", "bwd"): {"ring_kv_bwd": "forward", "ring_dkv": "forward"},
    ("tokenring", "fwd"): {"tokenring_q": "forward", "tokenring_out": "return"},
    ("tokenring", "bwd"): {"tokenring_q_bwd": "forward", "tokenring_dq": "return"},
}


def comm_table(seq: int = 8192, smoke: bool = False) -> str:
    n = 8
    mesh = mesh_of(n)
    out = [
        f"### Bytes one device sends per ring step, from the compiled HLO ({seq} tokens on {n} devices, "
        "head_dim 64, batch 1)\n",
        "From the result shapes of the collective-permutes of the compiled fwd+bwd program "
        "(`hlo_permute_bytes`). forward = to device d+1; return = TokenRing's results to the query's "
        "owner d-t. HLO bytes include the int32 positions that travel with a block "
        f"({4 * seq // n} bytes); the formula (`comm_bytes_per_step`) does not.\n",
        "| dtype | q/kv heads | impl | pass | forward B/step (HLO) | return B/step (HLO) "
        "| formula forward, return | busiest link direction B/step |",
        "|---|---|---|---|---:|---:|---|---:|",
    ]
    configs = ((jnp.float32, 8, 8), (jnp.float32, 8, 2), (jnp.bfloat16, 8, 8), (jnp.bfloat16, 8, 2))
    if smoke:
        configs = configs[1:2]
    for dtype, heads, kv_heads in configs:
        shapes = dict(batch=1, seq=seq, heads=heads, kv_heads=kv_heads, dim=64)
        for impl in ("ring", "tokenring"):
            hlo = compile_fwd_bwd(mesh, shapes, impl=impl, backward=True, dtype=dtype).as_text()
            streams = hlo_permute_bytes(hlo)
            for pas in ("fwd", "bwd"):
                counted = {"forward": 0, "return": 0}
                for stream, direction in _PASS_STREAMS[(impl, pas)].items():
                    counted[direction] += max(streams.get(stream, [0]))
                f = comm_bytes_per_step(block_len=seq // n, batch=1, heads=heads, kv_heads=kv_heads, head_dim=64,
                                        itemsize=jnp.dtype(dtype).itemsize, impl=impl, backward=pas == "bwd")
                fw, rt = counted["forward"], counted["return"]
                out.append(f"| {jnp.dtype(dtype).name} | {heads}/{kv_heads} | {impl} | {pas} | {fw} | {rt} "
                           f"| {f['forward']}, {f['return']} | {max(fw, rt)} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer sequence lengths")
    ap.add_argument("--out", default=None, help="also write the tables to this markdown file")
    ap.add_argument("--smoke", action="store_true",
                    help="smallest run: 2048 tokens on 1 and 8 devices, balance at 1024, one communication config")
    args = ap.parse_args()
    t0 = time.time()
    parts = [
        f"jax {jax.__version__}, {len(jax.devices())} simulated CPU devices\n",
        memory_table(args.quick, smoke=args.smoke),
        balance_table(1024 if args.smoke else 4096),
        comm_table(2048 if args.smoke else 8192, smoke=args.smoke),
    ]
    text = "\n\n".join(parts) + f"\n\n(took {time.time() - t0:.0f} s)\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
