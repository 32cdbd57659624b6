"""One DPO training step: tokax vs TRL's DPOTrainer, same model, same batch.

Both sides train Gemma 3 270M loaded from the same GGUF file (dequantized to
float32), full fine-tuning with AdamW (constant lr, no weight decay), beta
0.1 sigmoid loss, with a frozen reference copy whose forward runs every step
(TRL: an explicit ``ref_model`` loaded from the same file,
``precompute_ref_log_probs=False``; tokax: ``frozen['ref']``), on the same B
preference pairs of the code-continuation task, prompt + completion cut to
--max-length. TRL pads each batch to its longest sequence; tokax pads to the
same length (the longest encoded pair of the batch), so both run the same
[2B, T] shape. tokens/s counts the real (non-padding) tokens of the chosen and
rejected sequences of the step (TRL: its collated ``attention_mask``, tokax:
positions >= 0). TRL sees the same B pairs every step (a dataset of exactly B
rows, one step per epoch). tokax does not log the KL(ref || policy) metric
here (``log_ref_kl=False``): TRL does not compute it either.

Each side runs in its own subprocess, one after the other, so that peak
memory (max RSS of the process on CPU, loading included; the device's peak
bytes in use where JAX reports it) is its own. Step time is the median over
--steps steps after --warmup steps (the first includes compilation for tokax).

    python benchmarks/dpo_step.py [--pairs 4] [--max-length 128] [--steps 5] [--json]

With --json the last stdout line is one JSON object with ``tokax_tok_s``,
``trl_tok_s``, ``ratio`` (tokax / TRL) and both sides' full results.
TRL (`trl`, with `datasets`) is not a dependency of tokax: install the
`bench` extra (`pip install -e '.[bench]'`; it pins torch 2.13.0, which must
be the CPU build). When either side fails (TRL not importable included), the
table marks it, no JSON line is printed, one line on stderr names the side
and the error, and the exit status is 1.

``--tiny`` runs both sides on a random Gemma 3 model of the same structure
and vocabulary but 64 wide and 2 layers deep (``benchmarks/tiny_gemma.py``,
the same weights on both sides), still with the real tokenizer: a check that
both sides run, in seconds rather than minutes, whose numbers are not the
benchmark's. ``--smoke`` is the smallest run: ``--tiny`` with 1 pair, 1
warm-up step and 1 timed step.
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
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def build_pairs(n: int, seed: int = 0, context_lines: int = 8) -> list[dict]:
    from tokax.data.preference import build_code_preference_task

    rows = build_code_preference_task("train", n=n, seed=seed, context_lines=context_lines)
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]


def preference_rows(args) -> list[dict]:
    """The benchmark's pairs: read from ``--pairs-file`` (the parent builds them once for both
    sides) or built here."""
    if args.pairs_file:
        with open(args.pairs_file) as f:
            return json.load(f)
    return build_pairs(args.pairs, context_lines=args.context_lines)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_tokax(args) -> dict:
    import jax

    from tokax.model.loaders.gguf import load_gemma3
    from tokax.tokenize import load_gemma3_tokenizer
    from tokax.train import data as D
    from tokax.train import sharding as shd
    from tokax.train.optim import build_optimizer
    from tokax.train.step import StepSpec, init_train_state, make_train_step

    tok = load_gemma3_tokenizer()
    pairs, skipped = D.encode_preference(preference_rows(args), tok,
                                         args.max_length, bad_examples="skip")
    if skipped:
        raise ValueError(f"{len(skipped)} pair(s) do not fit --max-length={args.max_length}: {skipped[0]}")
    seq_len = max(len(e.ids) for pr in pairs for e in pr)  # TRL pads to the batch's longest sequence too
    it = D.PreferenceIterator(pairs, seq_len, batch_size=args.pairs, shuffle=False)
    batch = next(it)
    if args.tiny:
        import tiny_gemma

        cfg = tiny_gemma.tiny_config()
        params = tiny_gemma.tiny_params(cfg)
    else:
        cfg, params = load_gemma3("float32")
    mesh = shd.make_mesh({"data": -1})
    rules = shd.DEFAULT_RULES
    spec = StepSpec(model=cfg, loss="dpo", loss_kwargs=(("beta", 0.1),), logprob_chunk=16384, log_ref_kl=False)
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
    n_tok = sum(len(e.ids) for pr in pairs for e in pr)  # prompt + completion with BOS / EOS, as TRL's attention_mask
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    med = statistics.median(times)
    return {"impl": "tokax", "model": cfg.name, "backend": jax.default_backend(), "step_s": med, "tokens_per_s": n_tok / med,
            "tokens": n_tok, "shape": [2 * args.pairs, seq_len], "losses": losses, "step_times": times, "peak_rss_mb": peak_rss_mb(),
            "device_peak_mb": (stats or {}).get("peak_bytes_in_use", 0) / 2**20 or None}


def run_trl(args) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from tokax.model.loaders.gguf import gemma3_gguf_path

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    path = gemma3_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if args.tiny:
        import tiny_gemma

        cfg = tiny_gemma.tiny_config()
        params = tiny_gemma.tiny_params(cfg)  # drawn from the same seed as the tokax side's
        load = lambda: tiny_gemma.to_hf(cfg, params)  # noqa: E731
        model_name = cfg.name
    else:
        load = lambda: AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)  # noqa: E731
        model_name = "gemma3-270m"
    model, ref = load(), load()  # the reference: a second copy of the same weights, forward every step
    for m in (model, ref):
        # The GGUF weights are dequantized to float32 at load, but the model stays marked as quantized
        # (is_quantized, hf_quantizer), which makes transformers' Trainer refuse full fine-tuning;
        # nothing is quantized, so drop the marks the way transformers does for dequantized models.
        if getattr(m, "hf_quantizer", None) is not None:
            m.hf_quantizer.remove_quantization_config(m)
        assert all(p.dtype == torch.float32 for p in m.parameters())
    times: list[float] = []
    seen: list[tuple[list[int], int]] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, s, c, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, s, c, **kw):
            times.append(time.perf_counter() - self.t)
            log(f"trl step {len(times) - 1}: {times[-1]:.3f}s")

    class Recording(DPOTrainer):
        """Records the shape and real-token count of each collated batch (the tokens of the step)."""

        def compute_loss(self, model, inputs, *a, **kw):
            seen.append((list(inputs["input_ids"].shape), int(inputs["attention_mask"].sum())))
            return super().compute_loss(model, inputs, *a, **kw)

    n_steps = args.warmup + args.steps
    cfg = DPOConfig(
        output_dir=os.path.join(args.workdir, "trl"), per_device_train_batch_size=args.pairs,
        gradient_accumulation_steps=1, learning_rate=args.lr, beta=0.1, loss_type=["sigmoid"], max_steps=n_steps,
        max_length=args.max_length, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        bf16=False, fp16=False, weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
        dataloader_num_workers=0, seed=0, precompute_ref_log_probs=False,
    )
    ds = Dataset.from_list(preference_rows(args))  # one step per epoch
    trainer = Recording(model=model, ref_model=ref, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
    trainer.train()
    med = statistics.median(times[args.warmup :])
    n_tok = seen[-1][1]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"impl": "trl", "model": model_name, "backend": "torch-cpu", "step_s": med, "tokens_per_s": n_tok / med, "tokens": n_tok,
            "shape": seen[-1][0], "losses": losses, "step_times": times, "peak_rss_mb": peak_rss_mb(),
            "torch": torch.__version__, "trl": trl.__version__, "threads": torch.get_num_threads()}


def one_line(err: BaseException) -> str:
    """``Type: message`` on one line (a multi-line message joined, cut at 400 characters)."""
    msg = " ".join(str(err).split())
    return f"{type(err).__name__}: {msg[:400]}" if msg else type(err).__name__


def run_side(args) -> None:
    """``--impl``: one side in this process; its result (or why it failed) on one stdout line."""
    try:
        res = run_tokax(args) if args.impl == "tokax" else run_trl(args)
    except Exception as err:  # the parent reports it and exits non-zero
        import traceback

        traceback.print_exc()
        print("FAILED " + one_line(err), flush=True)
        sys.exit(1)
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--context-lines", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--tiny", action="store_true", help="a random 2-layer Gemma 3 on both sides (a check that both run)")
    ap.add_argument("--smoke", action="store_true", help="smallest run: --tiny --pairs 1 --warmup 1 --steps 1")
    ap.add_argument("--impl", choices=["tokax", "trl"], default=None, help="run one side in this process")
    ap.add_argument("--pairs-file", default="", help="JSON list of {prompt, chosen, rejected} (default: build them)")
    ap.add_argument("--workdir", default="/tmp/tokax_dpo_bench")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.tiny, args.pairs, args.warmup, args.steps = True, 1, 1, 1
    if args.impl:
        run_side(args)
        return
    os.makedirs(args.workdir, exist_ok=True)
    pairs_file = args.pairs_file or os.path.join(args.workdir, "pairs.json")
    if not args.pairs_file:
        with open(pairs_file, "w") as f:
            json.dump(build_pairs(args.pairs, context_lines=args.context_lines), f)
    results = []
    for impl in ("tokax", "trl"):
        cmd = [sys.executable, os.path.abspath(__file__), "--impl", impl] + [
            f"--pairs={args.pairs}", f"--max-length={args.max_length}", f"--context-lines={args.context_lines}", f"--steps={args.steps}",
            f"--warmup={args.warmup}", f"--lr={args.lr}", f"--workdir={args.workdir}", f"--pairs-file={pairs_file}"] + (["--tiny"] if args.tiny else [])
        log(f"running {impl} ...")
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # its stderr (progress, tracebacks) passes through
        lines = p.stdout.splitlines()
        got = [ln for ln in lines if ln.startswith("RESULT ")]
        if p.returncode == 0 and got:
            results.append(json.loads(got[-1][len("RESULT "):]))
        else:
            why = [ln[len("FAILED "):] for ln in lines if ln.startswith("FAILED ")]
            results.append({"impl": impl, "error": why[-1] if why else f"its process exited with status {p.returncode}"})
    model = "a random tiny Gemma 3 (benchmarks/tiny_gemma.py)" if args.tiny else "Gemma 3 270M"
    print(f"DPO step, {model} float32, {args.pairs} pairs, max length {args.max_length}, full fine-tuning + AdamW")
    print(f"{'impl':6s} {'backend':10s} {'step s':>8s} {'tok/s':>9s} {'peak RSS MB':>12s}  first losses")
    for r in results:
        if "error" in r:
            print(f"{r['impl']:6s} {'-':10s} {'-':>8s} {'-':>9s} {'-':>12s}  failed: {r['error']}")
        else:
            print(f"{r['impl']:6s} {r['backend']:10s} {r['step_s']:8.3f} {r['tokens_per_s']:9.1f} {r['peak_rss_mb']:12.0f}  "
                  f"{np.round(r['losses'][:3], 4).tolist()}")
    failed = [r for r in results if "error" in r]
    if failed:
        names = {"tokax": "tokax", "trl": "TRL"}
        for r in failed:
            log(f"dpo_step: the {names[r['impl']]} side failed: {r['error']}")
        sys.exit(1)
    ok = {r["impl"]: r for r in results}
    ratio = ok["tokax"]["tokens_per_s"] / ok["trl"]["tokens_per_s"]
    print(f"tokens per step: tokax {ok['tokax']['tokens']} {ok['tokax']['shape']}, trl {ok['trl']['tokens']} "
          f"{ok['trl']['shape']}; tokax / TRL tokens/s = {ratio:.2f}")
    if args.json:
        print(json.dumps({"model": ok["tokax"]["model"], "tokax_tok_s": ok["tokax"]["tokens_per_s"],
                          "trl_tok_s": ok["trl"]["tokens_per_s"], "ratio": ratio, "results": results}))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # this checkout's tokax, as the other scripts do
    main()
