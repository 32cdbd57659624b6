"""Distil the speculative-decoding draft for Gemma 3 270M and export it.

    python experiments/distill_gemma_draft.py                      # train (~30 min on 2 CPU cores) + export
    python experiments/distill_gemma_draft.py --export_only        # re-export an existing run
    python experiments/distill_gemma_draft.py --eval_only          # agreement of the shipped draft

Training is the training core's ``configs/distill.py:draft`` (forward KL from
Gemma 3 270M into its first 4 layers + LoRA, head over the 16k most frequent
stdlib tokens), with an orbax checkpoint in ``--workdir``. Export keeps only
the LoRA factors and the head's ids (``tokax.decode.proposers.distilled``),
by default into the package (``tokax/assets/gemma3_270m_draft``), which
``configs/speculative.py:draft`` loads. The evaluation decodes nothing: it
measures on held-out stdlib text how often the draft's greedy token equals
Gemma's (what a greedy verifier accepts) and how much of Gemma's greedy mass
lies in the head subset.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tokax.decode.proposers.distilled import DEFAULT_DRAFT_DIR, load_distilled_draft, save_distilled_draft  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def draft_config():
    spec = importlib.util.spec_from_file_location("_distill_config", os.path.join(ROOT, "configs", "distill.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config("draft")


def export(workdir: str, out: str) -> dict:
    """LoRA factors of the latest checkpoint in ``workdir`` + its head ids -> ``out``."""
    from tokax.model import lora as lora_lib
    from tokax.model.loaders.gguf import load_gemma3
    from tokax.train.checkpoint import restore_params

    c = draft_config()
    cfg, params = load_gemma3("float32")
    layers = [int(i) for i in c.model.from_teacher_layers]
    base = {"embed": params["embed"], "final_norm": params["final_norm"],
            **{f"layer_{i}": params[f"layer_{j}"] for i, j in enumerate(layers)}}
    abstract = jax.eval_shape(lambda k: lora_lib.lora_init(base, tuple(c.lora.targets), int(c.lora.rank),
                                                           float(c.lora.alpha), k), jax.random.PRNGKey(0))
    lora, meta = restore_params(os.path.join(workdir, "checkpoints"), abstract)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = [r for r in rows if "eval/kl" in r]
    train_tokens = sum(r.get("tokens", 0) for r in rows if "grad_norm" in r)
    info = {"teacher": cfg.name, "layers": layers, "lora_rank": int(c.lora.rank), "lora_alpha": float(c.lora.alpha),
            "lora_targets": list(c.lora.targets), "head_vocab": int(c.head_vocab), "config": "configs/distill.py:draft",
            "steps": int(meta["step"]), "train_tokens": int(train_tokens),
            "eval": [{"step": r["step"], "kl": round(r["eval/kl"], 4), "top1_agree": round(r["eval/top1_agree"], 4)}
                     for r in evals]}
    save_distilled_draft(out, lora, np.load(os.path.join(workdir, "head_ids.npy")), info)
    print(json.dumps({"exported": out, **{k: info[k] for k in ("steps", "train_tokens")}, "last_eval": info["eval"][-1:]}))
    return info


def evaluate(path: str | None, n_rows: int = 16, seq_len: int = 256) -> dict:
    """Held-out agreement of the exported draft with Gemma (teacher forcing on eval-split stdlib text)."""
    from tokax.decode.proposers.draft_model import draft_forward
    from tokax.model.decoder import forward
    from tokax.model.loaders.gguf import load_gemma3
    from tokax.tokenize import load_gemma3_tokenizer
    from tokax.data.stdlib import corpus_pieces
    from tokax.train.heads import token_rows

    cfg, params = load_gemma3("float32")
    dcfg, dp = load_distilled_draft(cfg, params, path)
    tok = load_gemma3_tokenizer()
    x = token_rows(tok, corpus_pieces("eval"), n_rows, seq_len)
    ids = np.asarray(dp["head_ids"])

    @jax.jit
    def run(xb):
        pos = jnp.broadcast_to(jnp.arange(xb.shape[1], dtype=jnp.int32)[None], xb.shape)
        p_lg, _, _ = forward(cfg, params, xb, pos)
        q_lg, _, _ = draft_forward(dcfg, dp, xb, pos)
        return jnp.argmax(p_lg, -1), jnp.argmax(q_lg, -1)

    agree, in_subset, n = 0, 0, 0
    for s in range(0, n_rows, 4):
        pg, qg = (np.asarray(a) for a in run(jnp.asarray(x[s : s + 4])))
        agree += int((pg == qg).sum())
        in_subset += int(np.isin(pg, ids).sum())
        n += pg.size
    res = {"positions": n, "top1_agree": round(agree / n, 4), "target_greedy_in_head": round(in_subset / n, 4)}
    print(json.dumps(res))
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/tokax_draft_gemma", help="training run directory (orbax checkpoints)")
    ap.add_argument("--out", default=str(DEFAULT_DRAFT_DIR), help="exported draft directory")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    ap.add_argument("--export_only", action="store_true")
    ap.add_argument("--eval_only", action="store_true")
    args = ap.parse_args(argv)
    if not (args.export_only or args.eval_only):
        from tokax.train.trainer import run

        c = draft_config()
        c.workdir = args.workdir
        c.tensorboard = False
        if args.steps:
            c.total_steps = args.steps
        run(c)
    res = {}
    if not args.eval_only:
        res["export"] = export(args.workdir, args.out)
    res["eval"] = evaluate(args.out)
    if not args.eval_only:
        meta_path = os.path.join(args.out, "meta.json")
        meta = json.load(open(meta_path))
        meta["heldout_eval"] = res["eval"]
        with open(meta_path, "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
    return res


if __name__ == "__main__":
    main()
