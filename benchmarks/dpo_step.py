"""One DPO training step: tokax vs TRL's DPOTrainer, same model, same batch.

Both sides train Gemma 3 270M loaded from the same GGUF file (dequantized to
float32), full fine-tuning with AdamW, the policy and a frozen reference
copy, on the same B preference pairs of the code-continuation task
(tokenized with Gemma's tokenizer, prompt + completion cut to --max-length).
Each side runs in its own subprocess so that peak memory (max RSS of the
process on CPU; the device's peak bytes in use where JAX reports it) is its
own. Step time is the median over --steps steps after --warmup steps (the
first includes compilation for tokax).

    python benchmarks/dpo_step.py [--pairs 4] [--max-length 128] [--steps 5] [--json]

TRL (`trl`, with `datasets`) is not a dependency of tokax; when it is not
importable the TRL row says so. Torch must be the pinned CPU build
(`pip install torch==2.13.0`, the `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def build_pairs(n: int, seed: int = 0) -> list[dict]:
    from tokax.train.data import build_code_preference_task

    rows = build_code_preference_task("train", n=n, seed=seed, context_lines=8)
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_tokax(args) -> dict:
    import jax

    from tokax.model.loaders.gguf import load_gemma3
    from tokax.tokenize import load_gemma3_tokenizer
    from tokax.train import data as D
    from tokax.train import sharding as shd
    from tokax.train.trainer import StepSpec, build_optimizer, init_train_state, make_train_step

    tok = load_gemma3_tokenizer()
    pairs, _ = D.encode_preference(build_pairs(args.pairs), tok, args.max_length, bad_examples="skip")
    it = D.PreferenceIterator(pairs, args.max_length, batch_size=args.pairs, shuffle=False)
    batch = next(it)
    cfg, params = load_gemma3("float32")
    mesh = shd.make_mesh({"data": -1})
    rules = shd.DEFAULT_RULES
    spec = StepSpec(model=cfg, loss="dpo", loss_kwargs=(("beta", 0.1),), logprob_chunk=16384)
    tx, sched = build_optimizer({"name": "adamw", "lr": args.lr, "schedule": "constant", "weight_decay": 0.0}, 100)
    p_sh = shd.param_shardings(params, mesh, rules)
    params = jax.device_put(params, p_sh)
    ref = jax.tree.map(lambda x: x.copy(), params)
    shapes = jax.eval_shape(lambda p: init_train_state(spec, p, tx), params)
    rep = shd.replicated(mesh)
    state_sh = {"step": rep, "params": p_sh, "opt_state": shd.opt_state_shardings(shapes["opt_state"], params, p_sh, mesh),
                "loss_state": {}, "nonfinite": rep}
    step = make_train_step(spec, tx, sched, mesh, rules, state_sh, {"ref": p_sh}, shd.batch_shardings(batch, mesh, rules))
    state = jax.jit(lambda p: init_train_state(spec, p, tx), out_shardings=state_sh)(params)
    del params
    frozen = {"ref": ref}
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        state, m = step(state, frozen, batch)
        loss = float(m["loss"])  # blocks until the step is done
        dt = time.perf_counter() - t
        losses.append(loss)
        if i >= args.warmup:
            times.append(dt)
        log(f"tokax step {i}: {dt:.3f}s loss {loss:.4f}")
    n_tok = int(sum((batch[k] >= 0).sum() for k in ("chosen_positions", "rejected_positions")))
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    med = statistics.median(times)
    return {"impl": "tokax", "backend": jax.default_backend(), "step_s": med, "tokens_per_s": n_tok / med,
            "tokens": n_tok, "losses": losses, "peak_rss_mb": peak_rss_mb(),
            "device_peak_mb": (stats or {}).get("peak_bytes_in_use", 0) / 2**20 or None}


def run_trl(args) -> dict:
    try:
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import DPOConfig, DPOTrainer
    except ImportError as err:
        return {"impl": "trl", "missing": f"{type(err).__name__}: {err}"}
    from tokax.model.loaders.gguf import gemma3_gguf_path

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    path = gemma3_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, s, c, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, s, c, **kw):
            times.append(time.perf_counter() - self.t)
            log(f"trl step {len(times) - 1}: {times[-1]:.3f}s")

    cfg = DPOConfig(
        output_dir=os.path.join(args.workdir, "trl"), per_device_train_batch_size=args.pairs,
        gradient_accumulation_steps=1, learning_rate=args.lr, beta=0.1, max_steps=args.warmup + args.steps,
        max_length=args.max_length, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        bf16=False, fp16=False, weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
        dataloader_num_workers=0, seed=0, remove_unused_columns=False,
    )
    ds = Dataset.from_list(build_pairs(args.pairs * (args.warmup + args.steps)))
    trainer = DPOTrainer(model=model, ref_model=None, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
    trainer.train()
    med = statistics.median(times[args.warmup :])
    # tokens per step: the batch TRL built for the last step is not exposed; count from the same pairs
    n_tok = 0
    for r in build_pairs(args.pairs):
        p = len(tok(r["prompt"]).input_ids)
        for side in ("chosen", "rejected"):
            n_tok += min(p + len(tok(r[side], add_special_tokens=False).input_ids) + 1, args.max_length)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"impl": "trl", "backend": "torch-cpu", "step_s": med, "tokens_per_s": n_tok / med, "tokens": n_tok,
            "losses": losses, "peak_rss_mb": peak_rss_mb(), "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--impl", choices=["tokax", "trl"], default=None, help="run one side in this process")
    ap.add_argument("--workdir", default="/tmp/tokax_dpo_bench")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.impl:
        res = run_tokax(args) if args.impl == "tokax" else run_trl(args)
        print("RESULT " + json.dumps(res), flush=True)
        return
    results = []
    for impl in ("tokax", "trl"):
        cmd = [sys.executable, os.path.abspath(__file__), "--impl", impl] + [
            f"--pairs={args.pairs}", f"--max-length={args.max_length}", f"--steps={args.steps}",
            f"--warmup={args.warmup}", f"--lr={args.lr}", f"--workdir={args.workdir}"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        results.append(json.loads(line[-1][7:]) if line else {"impl": impl, "error": p.stderr[-2000:]})
    print(f"DPO step, Gemma 3 270M float32, {args.pairs} pairs, max length {args.max_length}, full fine-tuning + AdamW")
    print(f"{'impl':6s} {'backend':10s} {'step s':>8s} {'tok/s':>9s} {'peak RSS MB':>12s}  first losses")
    for r in results:
        if "missing" in r or "error" in r:
            print(f"{r['impl']:6s} {'-':10s} {'-':>8s} {'-':>9s} {'-':>12s}  not run: {r.get('missing') or r.get('error')}")
        else:
            print(f"{r['impl']:6s} {r['backend']:10s} {r['step_s']:8.3f} {r['tokens_per_s']:9.1f} {r['peak_rss_mb']:12.0f}  "
                  f"{np.round(r['losses'][:3], 4).tolist()}")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
