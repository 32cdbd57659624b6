"""DPO and TDPO with LoRA on the real Gemma 3 270M, on the code preference task; held-out eval and plot.

    python experiments/gemma_dpo.py --out /tmp/gemma_pref [--losses dpo tdpo2] [--steps 30]
    python experiments/gemma_dpo.py --out /tmp/gemma_pref --time-step      # time one train step, exit
    python experiments/gemma_dpo.py --out /tmp/gemma_pref --plot-only      # redo the plot / table from the runs

Each loss trains ``configs/preference.py:gemma`` (LoRA r=8 on q/k/v/o, the
reference is the frozen base) through ``tokax.train.trainer.run`` into
OUT/<loss>/ (metrics.jsonl, checkpoints). The runs are sized for 2 CPU cores
(3-line prompts, seq_len 64, 4 pairs a step, 24 steps).

Held-out evaluation, on the same N pairs of the task's held-out split, of the
base model (= step 0: LoRA's B starts at 0, so the policy equals the
reference) and of each final policy (base + trained adapters):

    implicit reward   r(x, y) = beta (log pi(y|x) - log pi_ref(y|x))    (DPO eq. 5, summed log-probs)
    reward accuracy   mean_i 1[r(x_i, y_w) > r(x_i, y_l)],  margin  mean_i r(x_i, y_w) - r(x_i, y_l)
    log-prob accuracy mean_i 1[log pi(y_w|x_i) > log pi(y_l|x_i)],  log-prob margin likewise

At step 0 every implicit reward is exactly 0 (accuracy 0, margin 0 by
construction), so the log-prob accuracy / margin of the base vs the trained
policy is the comparison that says whether the model itself now prefers the
real line. Writes OUT/base.json, OUT/<loss>/result.json, docs/gemma_dpo.png (loss, train reward
accuracy and margin per step, held-out points at step 0 and the end).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make_config(loss: str, workdir: str, args: argparse.Namespace):
    from configs.preference import get_config

    c = get_config("gemma")
    c.workdir = workdir
    c.loss = loss
    c.total_steps = args.steps
    c.loss_kwargs.beta = args.beta
    c.data.context_lines = args.context_lines
    c.data.seq_len = args.seq_len
    c.data.batch_size = args.batch
    c.data.n_examples = args.n_train
    c.data.n_eval_examples = args.n_eval
    c.data.eval_batch_size = args.eval_batch
    c.eval_batches = args.n_eval // args.eval_batch
    c.eval_every = args.steps  # the trainer's own held-out eval, at the end
    c.checkpoint_every = args.steps
    c.optimizer.lr = args.lr
    c.optimizer.warmup_steps = args.warmup
    c.log_ref_kl = loss.startswith("tdpo")  # TDPO needs the KL; for DPO it only costs time
    c.progress = False
    c.tensorboard = False
    return c


def heldout_pairs(args):
    """The held-out pairs the trainer evaluates on (same builder, n, seed, context)."""
    from tokax.tokenize import load_gemma3_tokenizer
    from tokax.data.preference import build_code_preference_task
    from tokax.train import data as D

    rows = build_code_preference_task("eval", n=args.n_eval, seed=0, context_lines=args.context_lines)
    pairs, skipped = D.encode_preference(rows, load_gemma3_tokenizer(), args.seq_len, "skip")
    it = D.PreferenceIterator(pairs, args.seq_len, args.eval_batch, shuffle=False)
    return [next(it) for _ in range(len(pairs) // args.eval_batch)], len(skipped)


def pair_logps(cfg, params, batches) -> tuple[np.ndarray, np.ndarray]:
    """Summed completion log-probs log pi(y_w|x), log pi(y_l|x) per held-out pair, [N] each."""
    import jax
    import jax.numpy as jnp

    from tokax.model.decoder import forward
    from tokax.train.logprobs import sequence_logprobs, token_logprobs

    @jax.jit
    def seq(params, tokens, targets, positions, mask):
        _, h, _ = forward(cfg, params, tokens, positions, return_logits=False)  # h: [b, T, D]
        return sequence_logprobs(token_logprobs(h, params["embed"], targets, chunk_size=16384), mask)[0]

    out = {"chosen": [], "rejected": []}
    for b in batches:
        for side in out:
            f = [jnp.asarray(b[f"{side}_{k}"][0]) for k in ("tokens", "targets", "positions", "mask")]
            out[side].append(np.asarray(seq(params, *f)))
    return np.concatenate(out["chosen"]), np.concatenate(out["rejected"])


def final_adapters(workdir: str, base, lc, seed: int = 0):
    """The trained LoRA adapters from the run's last checkpoint."""
    import jax

    from tokax.model import lora as lora_lib
    from tokax.train.checkpoint import restore_params

    k_lora = jax.random.split(jax.random.PRNGKey(seed), 3)[1]  # as trainer.run draws them
    shapes = jax.eval_shape(lambda: lora_lib.lora_init(base, tuple(lc.targets), int(lc.rank), float(lc.alpha), k_lora))
    sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes)
    params, meta = restore_params(os.path.join(workdir, "checkpoints"), abstract)
    return params, meta


def summarize(pol_w, pol_l, ref_w, ref_l, beta: float) -> dict:
    rw, rl = beta * (pol_w - ref_w), beta * (pol_l - ref_l)
    return {"reward_accuracy": float(np.mean(rw > rl)), "reward_margin": float(np.mean(rw - rl)),
            "logp_accuracy": float(np.mean(pol_w > pol_l)), "logp_margin": float(np.mean(pol_w - pol_l)),
            "n": int(len(pol_w))}


def time_step(args) -> None:
    import jax

    from tokax.train import trainer

    c = make_config(args.losses[0], os.path.join(args.out, "timing_" + args.losses[0]), args)
    c.total_steps, c.eval_every, c.checkpoint_every = 3, 0, 1000
    times = []
    t0 = time.time()
    trainer.run(c, on_step=lambda s, m: times.append(time.time()))
    dts = np.diff([t0] + times)
    print(f"{args.losses[0]}: step wall times {np.round(dts, 1).tolist()} s (first includes load + compile); "
          f"backend {jax.default_backend()}")


def plot(out: str, summary: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = {"dpo": "tab:blue", "tdpo1": "tab:green", "tdpo2": "tab:orange"}
    for loss, res in summary["runs"].items():
        rows = [json.loads(ln) for ln in open(os.path.join(out, loss, "metrics.jsonl")) if ln.strip()]
        steps = np.array([r["step"] for r in rows])
        col = colors.get(loss, None)

        def smooth(k):
            x = np.array([r.get(k) if r.get(k) is not None else np.nan for r in rows], float)
            w = min(5, len(x))
            return np.convolve(np.nan_to_num(x), np.ones(w) / w, mode="valid"), x

        for ax, key, ev in ((axes[0], "loss", None), (axes[1], "rewards/accuracies", "reward_accuracy"),
                            (axes[2], "rewards/margins", "reward_margin")):
            sm, raw = smooth(key)
            ax.plot(steps, raw, color=col, alpha=0.25, lw=1)
            ax.plot(steps[len(steps) - len(sm):], sm, color=col, lw=2, label=f"{loss} train (5-step mean)")
            if ev:
                ax.plot([0, res["steps"]], [summary["base"][ev], res["final"][ev]], "o--", color=col, ms=7,
                        label=f"{loss} held-out ({res['final']['n']} pairs)")
    axes[0].set_title("preference loss (train batch)")
    axes[1].set_title("implicit-reward accuracy")
    axes[2].set_title("implicit-reward margin  beta*Delta")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Gemma 3 270M + LoRA (r=8, q/k/v/o), code preference task, tokax on CPU")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/tokax_gemma_pref")
    ap.add_argument("--losses", nargs="+", default=["dpo", "tdpo2"])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--context-lines", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--png", default=os.path.join(REPO, "docs", "gemma_dpo.png"))
    ap.add_argument("--time-step", action="store_true")
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.time_step:
        time_step(args)
        return
    if args.plot_only:
        plot(args.out, load_summary(args.out, args.losses), args.png)
        return

    import jax

    from tokax.model import lora as lora_lib
    from tokax.model.loaders.gguf import load_gemma3
    from tokax.train import trainer

    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), "
               f"jax {jax.__version__} ({jax.default_backend()})")
    batches, n_skip = heldout_pairs(args)
    cfg, base = load_gemma3("float32")
    t = time.time()
    base_w, base_l = pair_logps(cfg, base, batches)
    res0 = summarize(base_w, base_l, base_w, base_l, args.beta)
    res0.update(eval_s=time.time() - t, heldout_skipped=n_skip)
    print("step 0 (base):", res0, flush=True)
    with open(os.path.join(args.out, "base.json"), "w") as f:
        json.dump(res0, f, indent=1)
    for loss in args.losses:
        wd = os.path.join(args.out, loss)
        c = make_config(loss, wd, args)
        t = time.time()
        last = trainer.run(c)
        train_s = time.time() - t
        adapters, meta = final_adapters(wd, base, c.lora)
        pol = lora_lib.lora_merge(base, adapters, float(c.lora.alpha))
        pw, pl = pair_logps(cfg, pol, batches)
        res = {"steps": int(meta["step"]), "train_s": train_s, "final": summarize(pw, pl, base_w, base_l, args.beta),
               "trainer_eval": {k: v for k, v in last.items() if k.startswith("eval/")},
               "args": vars(args), "machine": machine}
        print(loss, json.dumps(res), flush=True)
        with open(os.path.join(wd, "result.json"), "w") as f:
            json.dump(res, f, indent=1)
    plot(args.out, load_summary(args.out, args.losses), args.png)


def load_summary(out: str, losses) -> dict:
    """OUT/base.json and the OUT/<loss>/result.json of every finished run."""
    runs = {}
    for loss in ("dpo", "tdpo1", "tdpo2", *losses):
        p = os.path.join(out, loss, "result.json")
        if os.path.exists(p) and loss not in runs:
            runs[loss] = json.load(open(p))
    return {"base": json.load(open(os.path.join(out, "base.json"))), "runs": runs}

if __name__ == "__main__":
    main()
