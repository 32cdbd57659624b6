"""Time tokax's Pallas kernels against XLA and the naive reference.

    python benchmarks/kernel_speed.py               # GPU/TPU: full sizes
    python benchmarks/kernel_speed.py --cpu-smoke   # small sizes (automatic on CPU)
    python benchmarks/kernel_speed.py --smoke       # smallest: one small size per section, 1 rep
    python benchmarks/kernel_speed.py --memory      # compiled memory: chunked vs full log-probs

(Named kernel_speed, not kernels: a script's folder comes first on
``sys.path``, and ``kernels`` is a PyPI package that transformers imports.)
With --json the last line is a JSON list of the rows printed. When an
implementation fails, one line on stderr names it, its shape and the error,
and the exit status is 1.

Each row prints the median wall time, achieved TFLOP/s (attention counts
4*B*H*Tq*Tk*D forward flops, halved for causal masks; backward 2.5x
forward) or bandwidth (GB/s of K/V read for tree attention), and their
fraction of the device ceilings measured at start-up: a large matmul
(TFLOP/s) and a large copy (GB/s, read + write). On CPU the kernels run in
Pallas interpret mode, so their timings there only show that the script
works, not kernel speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from tokax.kernels import reference as ref
from tokax.kernels.flash_attention import flash_attention
from tokax.kernels.logprobs import chunked_logprobs, chunked_logprobs_scan, full_logprobs
from tokax.kernels.tree_attention import tree_attention


ROWS: list[dict] = []  # every row printed, for --json


class ImplFailed(Exception):
    pass


def guarded(name: str, shape: str, fn, *args, **kw):
    """``fn(*args, **kw)``, an error turned into ``ImplFailed`` naming the implementation."""
    try:
        return fn(*args, **kw)
    except Exception as err:
        msg = " ".join(str(err).split())[:400]
        raise ImplFailed(f"{name} ({shape}) failed: {type(err).__name__}" + (f": {msg}" if msg else "")) from err


def bench(fn, *args, reps: int = 5) -> float:
    """Median seconds of a jitted call (after one warm-up/compile call)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ceilings(n_mm: int, n_copy: int, dtype) -> tuple[float, float]:
    """(TFLOP/s of an n x n matmul, GB/s of copying n_copy elements)."""
    a = jnp.ones((n_mm, n_mm), dtype)
    t = bench(jax.jit(lambda a: a @ a), a)
    x = jnp.ones((n_copy,), dtype)
    tc = bench(jax.jit(lambda x: x * 2), x)  # reads and writes every element
    return 2 * n_mm**3 / t / 1e12, 2 * x.nbytes / tc / 1e9


def row(name, shape, secs, flops=None, nbytes=None, peak=(1.0, 1.0), section=""):
    perf = ""
    rec = {"section": section, "impl": name, "shape": shape, "ms": secs * 1e3}
    if flops is not None:
        tf = flops / secs / 1e12
        perf = f"{tf:9.3f} TFLOP/s {100 * tf / peak[0]:6.1f}%"
        rec.update(tflops=tf, of_peak=tf / peak[0])
    elif nbytes is not None:
        gb = nbytes / secs / 1e9
        perf = f"{gb:9.1f} GB/s    {100 * gb / peak[1]:6.1f}%"
        rec.update(gbs=gb, of_peak=gb / peak[1])
    ROWS.append(rec)
    print(f"{name:<34} {shape:<24} {secs * 1e3:10.3f} ms  {perf}")


def timed_row(name, shape, fn, *args, reps, section, **row_kw):
    row(name, shape, guarded(name, shape, bench, fn, *args, reps=reps), section=section, **row_kw)


def attention_section(seqs, b, h, kvh, d, dtype, peak, reps):
    print("\n== causal attention, fwd and fwd+bwd ==")
    for t in seqs:
        ks = jax.random.split(jax.random.PRNGKey(t), 3)
        q = jax.random.normal(ks[0], (b, t, h, d), dtype)
        k = jax.random.normal(ks[1], (b, t, kvh, d), dtype)
        v = jax.random.normal(ks[2], (b, t, kvh, d), dtype)
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        impls = {
            "pallas flash": lambda q, k, v: flash_attention(q, k, v),
            "xla dot_product_attention": lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True),
            "naive reference": lambda q, k, v: ref.attention(
                q, k, v, ref.attention_mask(pos, pos, causal=True)),
        }
        fwd_flops = 4 * b * h * t * t * d / 2
        shape = f"B{b} T{t} H{h}/{kvh} D{d}"
        for name, f in impls.items():
            timed_row(name + " fwd", shape, jax.jit(f), q, k, v, reps=reps, section="attention",
                      flops=fwd_flops, peak=peak)
            loss = lambda q, k, v, f=f: jnp.sum(f(q, k, v).astype(jnp.float32))  # noqa: E731
            g = jax.jit(jax.grad(loss, (0, 1, 2)))
            timed_row(name + " fwd+bwd", shape, g, q, k, v, reps=reps, section="attention",
                      flops=3.5 * fwd_flops, peak=peak)


def tree_section(caches, b, t, h, kvh, d, dtype, peak, reps):
    print("\n== tree attention (T tree nodes over a cache), bandwidth of K/V read ==")
    tree = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    for s in caches:
        ks = jax.random.split(jax.random.PRNGKey(s), 5)
        q = jax.random.normal(ks[0], (b, t, h, d), dtype)
        ck, cv = (jax.random.normal(kk, (b, s, kvh, d), dtype) for kk in ks[1:3])
        tk, tv = (jax.random.normal(kk, (b, t, kvh, d), dtype) for kk in ks[3:5])
        lengths = jnp.full((b,), s)
        nbytes = 2 * (ck.nbytes + tk.nbytes)

        def naive(q, ck, cv, tk, tv):
            mask = jnp.concatenate([jnp.ones((b, t, s), bool), tree], -1)
            return ref.attention(q, jnp.concatenate([ck, tk], 1), jnp.concatenate([cv, tv], 1), mask)

        shape = f"B{b} T{t} S{s} H{h}/{kvh} D{d}"
        kern = jax.jit(lambda *a: tree_attention(*a, tree, cache_lengths=lengths))
        timed_row("pallas tree", shape, kern, q, ck, cv, tk, tv, reps=reps, section="tree",
                  nbytes=nbytes, peak=peak)
        timed_row("naive reference", shape, jax.jit(naive), q, ck, cv, tk, tv, reps=reps, section="tree",
                  nbytes=nbytes, peak=peak)


def logprobs_section(ntoks, v, d, dtype, peak, reps, kernel_chunk, scan_chunk):
    print("\n== per-token log-probs, fwd+bwd ==")
    for n in ntoks:
        ks = jax.random.split(jax.random.PRNGKey(n), 3)
        hidden = jax.random.normal(ks[0], (1, n, d), dtype)
        emb = (jax.random.normal(ks[1], (v, d)) * 0.05).astype(dtype)
        targets = jax.random.randint(ks[2], (1, n), 0, v)
        impls = {
            "pallas chunked": lambda h, e: chunked_logprobs(h, e, targets, chunk_size=kernel_chunk),
            "scan chunked": lambda h, e: chunked_logprobs_scan(h, e, targets, chunk_size=scan_chunk),
            "full logits": lambda h, e: full_logprobs(h, e, targets),
        }
        # forward 2NVD; backward recomputes logits (2NVD) plus dh and dE (4NVD).
        flops = 8 * n * v * d
        for name, f in impls.items():
            g = jax.jit(jax.grad(lambda h, e, f=f: jnp.sum(f(h, e)), (0, 1)))
            timed_row(name, f"N{n} V{v} D{d}", g, hidden, emb, reps=reps, section="logprobs", flops=flops, peak=peak)


def memory_section(b=8, t=1024, v=262144, d=640, scan_chunk=8192, kernel_chunk=128):
    """Compiled memory (no execution) of log-probs on Gemma's vocabulary."""
    print(f"\n== compiled memory, log-probs B{b} x T{t}, V={v}, D={d} float32 "
          f"({jax.default_backend()}) ==")
    hidden = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    emb = jax.ShapeDtypeStruct((v, d), jnp.float32)
    targets = jax.ShapeDtypeStruct((b, t), jnp.int32)
    impls = {
        "full logits": full_logprobs,
        f"scan chunked (chunk {scan_chunk})":
            lambda h, e, y: chunked_logprobs_scan(h, e, y, chunk_size=scan_chunk),
        f"pallas chunked (chunk {kernel_chunk})":
            lambda h, e, y: chunked_logprobs(h, e, y, chunk_size=kernel_chunk),
    }
    print(f"{'implementation':<30} {'pass':<9} {'temp MiB':>10} {'args MiB':>10} {'out MiB':>10}")
    for name, f in impls.items():
        for mode, fn in (("fwd", f),
                         ("fwd+bwd", jax.grad(lambda h, e, y, f=f: jnp.sum(f(h, e, y)), (0, 1)))):
            shape = f"B{b} T{t} V{v} D{d} {mode}"
            mem = guarded(name, shape, lambda fn=fn: jax.jit(fn).lower(hidden, emb, targets).compile().memory_analysis())
            mib = lambda x: x / 2**20  # noqa: E731
            ROWS.append({"section": "memory", "impl": name, "shape": shape, "temp_mib": mib(mem.temp_size_in_bytes),
                         "args_mib": mib(mem.argument_size_in_bytes), "out_mib": mib(mem.output_size_in_bytes)})
            print(f"{name:<30} {mode:<9} {mib(mem.temp_size_in_bytes):10.2f} "
                  f"{mib(mem.argument_size_in_bytes):10.2f} {mib(mem.output_size_in_bytes):10.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="small sizes (default on CPU)")
    ap.add_argument("--smoke", action="store_true", help="smallest run: one small size per section, 1 rep")
    ap.add_argument("--memory", action="store_true", help="only the compiled-memory comparison")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="end with a JSON line of every row")
    args = ap.parse_args()
    try:
        run(args)
    except ImplFailed as err:
        import traceback

        traceback.print_exception(err.__cause__)
        print(f"kernel_speed: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    if args.json:
        print(json.dumps(ROWS))


def run(args):
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {jax.devices()[0].device_kind}")
    if args.memory:
        memory_section()
        return
    if args.smoke:
        dtype, reps = jnp.float32, args.reps or 1
        peak = ceilings(256, 1 << 20, dtype)
        seqs, b, h, kvh, d = (128,), 1, 2, 1, 32
        tree_args = ((256,), 1, 8, 4, 1, 32)
        lp_args = ((128,), 1024, 64, 128, 512)
    elif args.cpu_smoke or jax.default_backend() == "cpu":
        dtype, reps = jnp.float32, args.reps or 3
        peak = ceilings(512, 1 << 24, dtype)
        seqs, b, h, kvh, d = (128, 256), 1, 2, 1, 32
        tree_args = ((256, 1024), 1, 8, 4, 1, 32)
        lp_args = ((256,), 4096, 64, 128, 1024)
    else:
        dtype, reps = jnp.bfloat16, args.reps or 10
        peak = ceilings(8192, 1 << 30, dtype)
        seqs, b, h, kvh, d = (1024, 2048, 4096, 8192), 4, 16, 4, 128
        tree_args = ((4096, 32768), 8, 64, 8, 1, 256)
        lp_args = ((8192,), 262144, 640, 128, 8192)
    print(f"ceilings: matmul {peak[0]:.3f} TFLOP/s, copy {peak[1]:.1f} GB/s ({jnp.dtype(dtype).name})")
    attention_section(seqs, b, h, kvh, d, dtype, peak, reps)
    caches, tb, tt, th, tkvh, td = tree_args
    tree_section(caches, tb, tt, th, tkvh, td, dtype, peak, reps)
    ntoks, v, ld, kchunk, schunk = lp_args
    logprobs_section(ntoks, v, ld, dtype, peak, reps, kchunk, schunk)


if __name__ == "__main__":
    main()
