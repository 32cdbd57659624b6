"""Every script in benchmarks/ runs, in its smallest mode, with both sides on.

Each slow test starts a benchmark the way a user does (``python benchmarks/X.py``
from the repository root, so that benchmarks/ is first on the child's
``sys.path``, as it is for them) and checks that it exits 0 and reports a
number for each side it compares. The model-based ones run on the random
tiny Gemma of ``benchmarks/tiny_gemma.py`` here (the same weights on both
sides), and two run at a time (most of each is single-threaded start-up and
compilation), to keep the module within a few minutes on 2 CPU cores; the
full-size runs are the ones in docs/benchmarks.md. Their timings here mean
nothing.

The fast test checks that no script in benchmarks/ takes the name of an
importable module: ``benchmarks/kernels.py`` once hid the ``kernels`` package
from transformers, which broke every benchmark that imports it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

# Modules that transformers, TRL, torch or accelerate import when present (a script named like
# one would hide it from them even where it is not installed here).
OPTIONAL_IMPORTS = {
    "kernels", "accelerate", "datasets", "peft", "deepspeed", "bitsandbytes", "flash_attn", "triton",
    "safetensors", "tokenizers", "huggingface_hub", "sentencepiece", "gguf", "torch", "torchvision",
    "liger_kernel", "vllm", "wandb", "tensorboard", "rich", "optimum", "timm", "PIL", "scipy", "sklearn",
    "llama_cpp", "jax", "flax", "optax", "numpy",
}

# The smallest run of each benchmark script (both sides on), longest first (the order they start in).
SMOKE = {
    "dpo_step": ["--smoke", "--json"],
    "speculative": ["--smoke", "--json"],
    "tree_smoke": ["--smoke", "--json"],
    "byte_level": ["--smoke", "--json"],
    "decode_speed": ["--smoke", "--json"],
    "ring_attention": ["--smoke"],
    "screen": ["--smoke", "--json"],
    "pass_cost": ["--smoke", "--json"],
    "kernel_speed": ["--smoke", "--json"],
}


def scripts() -> list[str]:
    """Stems of the runnable scripts in benchmarks/ (helpers such as tiny_gemma.py have no main)."""
    return sorted(p.stem for p in BENCH.glob("*.py") if "__main__" in p.read_text())


def child_env() -> dict:
    """This process's environment without what would change how the child imports or runs:
    PYTHONPATH / PYTHONSAFEPATH and the like (PYTHONSAFEPATH=1 would keep benchmarks/ off the
    child's sys.path and hide a shadowing script), and the XLA / JAX settings tests make for
    themselves (conftest's matmul precision, simulated device counts)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "XLA_", "JAX_")) or k == "JAX_PLATFORMS"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def smoke_args(name: str, workdir: Path) -> list[str]:
    return SMOKE[name] + (["--workdir", str(workdir)] if name == "dpo_step" else [])


def start(name: str, workdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *smoke_args(name, workdir)], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def launched(request, tmp_path_factory):
    """The smoke runs of the benchmarks this pytest run selected, started together, two at a time:
    ``{name: Future of its CompletedProcess}``."""
    mine = [it for it in request.session.items if it.module is request.module]
    names = [n for n in SMOKE if any(it.originalname == f"test_{n}" for it in mine)]
    pool = ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1)))
    futures = {n: pool.submit(start, n, tmp_path_factory.mktemp(n)) for n in names}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def run_benchmark(name: str, launched) -> subprocess.CompletedProcess:
    r = launched[name].result()
    assert r.returncode == 0, f"{name} {' '.join(SMOKE[name])} exited {r.returncode}:\n{r.stderr[-4000:]}"
    return r


def last_json(r: subprocess.CompletedProcess):
    return json.loads(r.stdout.strip().splitlines()[-1])


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_no_benchmark_shadows_an_importable_module():
    assert not (BENCH / "kernels.py").exists(), "benchmarks/kernels.py hides the kernels package from transformers"
    stems = [p.stem for p in BENCH.glob("*.py")]
    clash = sorted(set(stems) & (OPTIONAL_IMPORTS | set(sys.stdlib_module_names)))
    assert not clash, f"benchmarks/ has scripts named like modules other code imports: {clash}"
    # What is importable here, with benchmarks/ itself off the path.
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
    try:
        found = {s: importlib.util.find_spec(s) for s in stems}
    finally:
        sys.path[:] = saved
    clash = {s: spec.origin for s, spec in found.items() if spec is not None}
    assert not clash, f"benchmarks/ scripts that hide an importable module: {clash}"


def test_every_benchmark_has_a_smoke_run():
    assert scripts() == sorted(SMOKE)


@pytest.mark.slow
def test_dpo_step(launched):
    out = last_json(run_benchmark("dpo_step", launched))
    assert positive(out["tokax_tok_s"]) and positive(out["trl_tok_s"]) and positive(out["ratio"]), out
    tokax, trl = out["results"]
    assert (tokax["impl"], trl["impl"]) == ("tokax", "trl")
    assert tokax["tokens"] == trl["tokens"] and tokax["shape"] == trl["shape"]  # the same batch
    # The same model and step on both sides: DPO starts at log 2, and the first update moves both alike.
    assert tokax["losses"][0] == pytest.approx(math.log(2), abs=1e-5)
    assert tokax["losses"][1] == pytest.approx(trl["losses"][1], abs=1e-3)


@pytest.mark.slow
def test_speculative(launched):
    out = last_json(run_benchmark("speculative", launched))
    assert positive(out["code"]["best_speedup"]) and positive(out["code"]["hf_prompt_lookup_speedup"]), out


@pytest.mark.slow
def test_tree_smoke(launched):
    out = last_json(run_benchmark("tree_smoke", launched))
    assert positive(out["plain_seconds"]) and {m["method"] for m in out["methods"]} == {"token_recycling", "dyspec"}, out
    assert all(positive(m["speedup"]) and m["tokens_per_pass"] >= 1 for m in out["methods"]), out


@pytest.mark.slow
def test_byte_level(launched):
    out = last_json(run_benchmark("byte_level", launched))
    assert all(positive(out["bytes_per_s"][m]) for m in ("naive", "token_healing", "byte")), out


@pytest.mark.slow
def test_decode_speed(launched):
    out = last_json(run_benchmark("decode_speed", launched))
    assert positive(out["tokax_tok_s"]) and positive(out["hf_tok_s"]), out
    assert out["ratio"] == pytest.approx(out["tokax_tok_s"] / out["hf_tok_s"])


@pytest.mark.slow
def test_ring_attention(launched):
    text = run_benchmark("ring_attention", launched).stdout
    for needle in ("| ring | 1 | 2048 |", "| tokenring | 8 | 2048 |", "Baseline: single-device full attention",
                   "| zigzag | tokenring |", "| float32 | 8/2 | tokenring | bwd |"):
        assert needle in text, (needle, text[-3000:])


@pytest.mark.slow
def test_screen(launched):
    out = last_json(run_benchmark("screen", launched))
    (row,) = out["rows"]
    assert positive(row["float32_ms"]) and positive(row["screen_ms"]), out
    assert row["same_tokens"] and out["all_positions_equal"]  # the screen is exact by construction


@pytest.mark.slow
def test_pass_cost(launched):
    out = last_json(run_benchmark("pass_cost", launched))
    assert set(out["ms"]) == {"1", "2"} and all(map(positive, out["ms"].values())), out
    assert all(map(positive, out["prefill_ms"].values()))


@pytest.mark.slow
def test_kernel_speed(launched):
    rows = last_json(run_benchmark("kernel_speed", launched))
    for section, ours, theirs in (("attention", "pallas flash", "xla dot_product_attention"),
                                  ("tree", "pallas tree", "naive reference"),
                                  ("logprobs", "pallas chunked", "full logits")):
        for impl in (ours, theirs):
            got = [r["ms"] for r in rows if r["section"] == section and r["impl"].startswith(impl)]
            assert got and all(map(positive, got)), (section, impl, rows)
