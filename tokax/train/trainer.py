"""The trainer: ``run(config)`` sets up models, data, state and checkpoints, then loops.

    from tokax.train.trainer import run
    final_metrics = run(config)          # config from configs/{sft,distill,preference}.py

The pieces it puts together: the optimizer (``tokax.train.optim``), the jitted
sharded train and eval steps (``tokax.train.step``), the batches
(``tokax.train.data``), checkpoints and resume (``tokax.train.checkpoint``,
``tokax.train.workdir``) and the metrics files (``tokax.train.metrics``). What a
loss needs set up (a teacher, a reference copy, contrastive prompts, a head over
a token subset) comes from its ``LossInfo`` declaration.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tokax.console import note, progress_disabled
from tokax.data.preference import build_code_preference_task, preference_to_unpaired, read_jsonl, write_jsonl
from tokax.data.stdlib import corpus_pieces, frequent_token_ids
from tokax.model import lora as lora_lib
from tokax.model.config import PRESETS, ModelConfig
from tokax.model.decoder import init_params
from tokax.train import data as data_lib
from tokax.train import sharding as shd
from tokax.train.checkpoint import Checkpointer, abstract_state, restore_params
from tokax.train.losses import LOSS_INFO, assert_finite, get_loss
from tokax.train.metrics import MetricsLogger
from tokax.train.optim import build_optimizer
from tokax.train.step import SUPPORTED_LOSSES, StepSpec, init_train_state, make_eval_step, make_train_step
from tokax.train.workdir import WorkdirError, WorkdirLock, check_checkpoint_meta, check_config, save_config

__all__ = ["SUPPORTED_LOSSES", "run"]

log = logging.getLogger("tokax.train")

Params = Any

# T-REG's contrastive prompts (Zhou et al. 2024) for the shipped code-continuation task: the
# reference scores each response token after an instruction to write better / worse code.
DEFAULT_BETTER_PREFIX = "# Continue the function below with its correct, idiomatic next line of Python.\n"
DEFAULT_WORSE_PREFIX = "# Continue the function below with a wrong, garbled or unrelated line of Python.\n"


def _get(c: Any, key: str, default: Any = None) -> Any:
    return c.get(key, default) if hasattr(c, "get") else getattr(c, key, default)


def _model_config(mc: Any, vocab_size: int | None) -> ModelConfig:
    preset = _get(mc, "preset", "tiny")
    if preset not in PRESETS:
        raise ValueError(f"model.preset={preset!r}: choose one of {sorted(PRESETS)}")
    kw = dict(_get(mc, "overrides", {}) or {})
    if _get(mc, "dtype"):
        kw["dtype"] = _get(mc, "dtype")
    if vocab_size is not None and preset != "gemma3-270m":
        kw["vocab_size"] = int(vocab_size)
    return PRESETS[preset](**kw)


def _load_model(mc: Any, vocab_size: int, rng: jax.Array, mesh, rules) -> tuple[ModelConfig, Params, dict]:
    """Model config and params per ``mc.init``: 'random', 'gemma3' (real Gemma 3 270M),
    or 'checkpoint:DIR' (the params of another tokax run)."""
    init = _get(mc, "init", "random")
    if init == "gemma3":
        from tokax.model.loaders.gguf import load_gemma3

        cfg, params = load_gemma3(dtype=_get(mc, "dtype", "float32") or "float32")
        kw = dict(_get(mc, "overrides", {}) or {})
        if kw:
            cfg = cfg.replace(**kw)
        sh = shd.param_shardings(params, mesh, rules)
        return cfg, jax.device_put(params, sh), {"source": "gemma3"}
    cfg = _model_config(mc, vocab_size)
    shapes = jax.eval_shape(lambda r: init_params(cfg, r), rng)
    sh = shd.param_shardings(shapes, mesh, rules)
    if init == "random":
        std = float(_get(mc, "embed_init_std", 0.0) or 0.0)

        def fresh(r):
            p = init_params(cfg, r)
            if std:  # the decoder draws the tied embedding with std 1 (logits of size sqrt(D) at init)
                p = {**p, "embed": p["embed"] * jnp.asarray(std, p["embed"].dtype)}
            return p

        params = jax.jit(fresh, out_shardings=sh)(rng)
        return cfg, params, {"source": "random"}
    if isinstance(init, str) and init.startswith("checkpoint:"):
        params, meta = restore_params(os.path.join(init.split(":", 1)[1], "checkpoints"), abstract_state(shapes, sh))
        if meta.get("lora_alpha") is not None:
            raise ValueError(f"model.init={init!r}: that run trained LoRA adapters; merge them first")
        return cfg, params, {"source": init, "step": meta.get("step")}
    raise ValueError(f"model.init={init!r}: use 'random', 'gemma3' or 'checkpoint:DIR'")


def _loss_kwargs(loss: str, raw: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """Hyperparameters the loss accepts; config placeholders left at None are dropped."""
    fn = get_loss(loss)
    params = inspect.signature(fn).parameters
    extra = set(LOSS_INFO[loss].extra_inputs)
    out = []
    for k, v in dict(raw or {}).items():
        if v is None:
            continue
        if k in params and k not in extra and k != "batch":
            out.append((k, v))
        else:
            log.info("loss_kwargs.%s=%r is not a hyperparameter of %s; ignored", k, v, loss)
    return tuple(sorted(out))


def _host_tokens(batch: Mapping[str, np.ndarray]) -> int:
    return int(sum(np.sum(v >= 0) for k, v in batch.items() if k.endswith("positions")))


def _build_data(config, tok, kind: str, workdir: str, state: Mapping | None, split: str):
    dc = config.data
    seq_len, bs, ga = int(dc.seq_len), int(dc.batch_size), int(_get(dc, "grad_accum", 1))
    seed = int(_get(config, "seed", 0))
    train = split == "train"
    if kind == "token":
        pieces = corpus_pieces(split, int(_get(dc, "piece_chars", 2000)), _get(dc, "max_files") or None)
        it = data_lib.PackedTextIterator(pieces, tok, seq_len, bs if train else int(_get(dc, "eval_batch_size", bs)),
                                         ga if train else 1, seed, state, shuffle=train)
        return it, []
    path = _get(dc, "path" if train else "eval_path", "") or ""
    if not path:
        n = int(_get(dc, "n_examples" if train else "n_eval_examples", 2000 if train else 256))
        ctx = int(_get(dc, "context_lines", 8))
        path = os.path.join(workdir, "data", f"code_pref_{split}_{n}_c{ctx}_s{seed}.jsonl")
        if not os.path.exists(path):
            rows = build_code_preference_task(split, n=n, seed=seed, context_lines=ctx)
            write_jsonl(path, rows)
    rows = read_jsonl(path)
    policy = _get(dc, "bad_examples", "error")
    ebs = bs if train else int(_get(dc, "eval_batch_size", bs))
    if kind == "paired":
        pairs, skipped = data_lib.encode_preference(rows, tok, seq_len, policy)
        it = data_lib.PreferenceIterator(pairs, seq_len, ebs, ga if train else 1, seed, state, shuffle=train)
    else:
        if rows and "completion" not in rows[0]:
            rows = preference_to_unpaired(rows)
        ex, skipped = data_lib.encode_unpaired(rows, tok, seq_len, policy)
        it = data_lib.UnpairedIterator(ex, seq_len, ebs, ga if train else 1, seed, state, shuffle=train)
    return it, skipped


def run(config: Any, *, on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
    """Train per ``config`` (see configs/sft.py for the keys); resume from ``workdir`` when it
    holds a checkpoint. Returns the final metrics (last train step + last eval).

    ``on_step(step, metrics)`` is called after every logged step (notebooks, tests).
    """
    if _get(config, "job", "train") != "train":
        raise ValueError(f"trainer.run got config.job={_get(config, 'job')!r}; it runs job='train'")
    workdir = os.path.abspath(os.path.expanduser(str(config.workdir)))
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"workdir {workdir} is a file; pass a directory as --config.workdir")
    os.makedirs(workdir, exist_ok=True)
    lock = WorkdirLock(workdir)  # one run per workdir: a second one stops here
    try:
        allow = bool(_get(config, "allow_config_change", False))
        check_config(workdir, config, allow, log=lambda m: note("tokax.train", m))
        return _run(config, workdir, on_step)
    finally:
        lock.release()


def _run(config: Any, workdir: str, on_step) -> dict[str, float]:
    t_start = time.time()
    total_steps = int(config.total_steps)
    seed = int(_get(config, "seed", 0))
    loss_name = str(config.loss)
    if loss_name not in SUPPORTED_LOSSES:
        raise ValueError(f"config.loss={loss_name!r}: the trainer supports {list(SUPPORTED_LOSSES)}")
    info = LOSS_INFO[loss_name]
    mesh_cfg = dict(_get(config, "mesh", {}) or {})
    rules = tuple(tuple(r) for r in mesh_cfg.pop("rules", shd.DEFAULT_RULES))
    mesh = shd.make_mesh(mesh_cfg)

    dc = config.data
    tok = data_lib.get_tokenizer(_get(dc, "tokenizer", "spm"), int(_get(dc, "vocab_size", 1024)),
                                 _get(dc, "tokenizer_dir", "") or workdir)
    rng = jax.random.PRNGKey(seed)
    k_model, k_lora, k_teacher = jax.random.split(rng, 3)
    teacher_cfg, teacher = None, None
    layers = None
    if info.needs_teacher:
        tc = config.teacher
        teacher_cfg, teacher, _ = _load_model(tc, tok.vocab_size, jax.random.PRNGKey(int(_get(tc, "seed", seed + 1))), mesh, rules)
        layers = _get(config.model, "from_teacher_layers", None)
    if layers:  # student = a subset of the teacher's layers (layer dropping, as DistilBERT's init)
        layers = [int(x) for x in layers]
        cfg = teacher_cfg.replace(n_layers=len(layers), name=f"{teacher_cfg.name}-l{len(layers)}")
        base = {"embed": teacher["embed"], "final_norm": teacher["final_norm"],
                **{f"layer_{i}": teacher[f"layer_{j}"] for i, j in enumerate(layers)}}
        base = jax.tree.map(lambda x: x.copy(), base)
    else:
        cfg, base, _ = _load_model(config.model, tok.vocab_size, k_model, mesh, rules)
    if cfg.vocab_size < tok.vocab_size:
        raise ValueError(f"model vocab {cfg.vocab_size} < tokenizer vocab {tok.vocab_size}")

    lc = _get(config, "lora", None)
    use_lora = bool(lc is not None and _get(lc, "enabled", False))
    prefixes = None
    if info.needs_contrastive_rewards:
        cp = _get(config, "contrastive_prompts", None)
        better = str(_get(cp, "better", "") or DEFAULT_BETTER_PREFIX) if cp is not None else DEFAULT_BETTER_PREFIX
        worse = str(_get(cp, "worse", "") or DEFAULT_WORSE_PREFIX) if cp is not None else DEFAULT_WORSE_PREFIX
        prefixes = (tuple(int(i) for i in tok.encode(better)), tuple(int(i) for i in tok.encode(worse)))
    spec = StepSpec(
        model=cfg, loss=loss_name, loss_kwargs=_loss_kwargs(loss_name, _get(config, "loss_kwargs", None)),
        lora_alpha=float(lc.alpha) if use_lora else None, teacher=teacher_cfg,
        logprob_chunk=int(_get(config, "logprob_chunk", 0)) or None, log_ref_kl=bool(_get(config, "log_ref_kl", True)),
        logprobs_impl=str(_get(config, "logprobs_impl", "auto")), contrastive_prefixes=prefixes,
    )
    frozen: dict[str, Any] = {}
    if use_lora:
        trainable = lora_lib.lora_init(base, tuple(lc.targets), int(lc.rank), float(lc.alpha), k_lora)
        frozen["base"] = base
    else:
        trainable = base
        if info.needs_reference:
            frozen["ref"] = jax.tree.map(lambda x: x.copy(), base)  # fixed at the initial params
    if teacher is not None:
        frozen["teacher"] = teacher
    head_vocab = int(_get(config, "head_vocab", 0) or 0)
    if head_vocab:
        if not info.head_subset:
            raise ValueError(f"config.head_vocab={head_vocab} is a distillation option (a draft head over the "
                             f"most frequent tokens); loss={loss_name!r} does not use it")
        ids_path = os.path.join(workdir, "head_ids.npy")
        if os.path.exists(ids_path):  # resume: the same subset the checkpoint was trained on
            ids = np.load(ids_path)
        else:
            ids = frequent_token_ids(tok, head_vocab, split="train", max_files=int(_get(dc, "max_files", 0)))
            os.makedirs(workdir, exist_ok=True)
            np.save(ids_path, ids)
        if len(ids) != head_vocab:
            raise ValueError(f"{ids_path} holds {len(ids)} ids, config.head_vocab={head_vocab}; use a fresh workdir")
        frozen["head_ids"] = jnp.asarray(ids, jnp.int32)

    tx, schedule = build_optimizer(config.optimizer, total_steps)
    param_sh = shd.param_shardings(trainable, mesh, rules)
    trainable = jax.device_put(trainable, param_sh)
    state_shapes = jax.eval_shape(lambda p: init_train_state(spec, p, tx), trainable)
    rep = shd.replicated(mesh)
    state_sh = {
        "step": rep, "params": param_sh,
        "opt_state": shd.opt_state_shardings(state_shapes["opt_state"], trainable, param_sh, mesh),
        "loss_state": jax.tree.map(lambda _: rep, state_shapes["loss_state"]), "nonfinite": rep,
    }
    frozen_sh = {k: shd.replicated(mesh) if k == "head_ids" else shd.param_shardings(v, mesh, rules)
                 for k, v in frozen.items()}

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=int(_get(config, "keep_checkpoints", 2)),
                        async_save=bool(_get(config, "async_checkpoint", True)))
    logger = MetricsLogger(workdir, tensorboard=bool(_get(config, "tensorboard", True)))
    data_state, start, resumed = None, 0, None
    if ckpt.latest_step() is not None:
        allow = bool(_get(config, "allow_config_change", False))
        # (also for workdirs from before config.json: the checkpoint records loss, model and LoRA)
        check_checkpoint_meta(ckpt.restore_meta(), loss_name, dataclasses.asdict(cfg), spec.lora_alpha,
                              ckpt.directory, allow)
        state, meta, bad = ckpt.restore_intact(abstract_state(state_shapes, state_sh))
        data_state, start, resumed = meta["data"], int(meta["step"]), int(meta["step"])
        if bad:
            moved = ckpt.set_aside([b for b, _ in bad], os.path.join(workdir, "corrupt_checkpoints"))
            for (b, why), dest in zip(bad, moved):
                note("tokax.train", f"warning: checkpoint step {b} is unreadable ({why}); moved to {dest}")
            note("tokax.train", f"warning: fell back to the newest intact checkpoint, step {start}")
        logger.truncate_after(start)
        note("tokax.train", f"resumed from step {start} ({ckpt.directory})")
    else:
        state = jax.jit(lambda p: init_train_state(spec, p, tx), out_shardings=state_sh)(trainable)
    del trainable
    save_config(workdir, config, log=lambda m: note("tokax.train", m))  # the run has its state: record its config

    train_it, skipped = _build_data(config, tok, info.kind, workdir, data_state, "train")
    if skipped:
        note("tokax.train", f"skipped {len(skipped)} bad training example(s); first: {skipped[0]}")
    first = next(train_it)
    batch_sh = shd.batch_shardings(first, mesh, rules)
    step_fn = make_train_step(spec, tx, schedule, mesh, rules, state_sh, frozen_sh, batch_sh)

    eval_every = int(_get(config, "eval_every", 0))
    eval_batches = []
    if eval_every:
        eit, _ = _build_data(config, tok, info.kind, workdir, None, "eval")
        eval_batches = [next(eit) for _ in range(int(_get(config, "eval_batches", 2)))]
        ev_fn = make_eval_step(spec, mesh, rules, param_sh, frozen_sh, shd.batch_shardings(eval_batches[0], mesh, rules))

    def evaluate() -> dict[str, float]:
        acc: dict[str, float] = {}
        for b in eval_batches:
            m = jax.device_get(ev_fn(state["params"], frozen, state["loss_state"], b))
            for k, v in m.items():
                acc[k] = acc.get(k, 0.0) + float(v) / len(eval_batches)
        return {f"eval/{k}": v for k, v in acc.items()}

    ckpt_every = int(_get(config, "checkpoint_every", 100))
    log_every = max(1, int(_get(config, "log_every", 1)))
    nonfinite = _get(config, "nonfinite", "skip")
    if nonfinite not in ("skip", "error"):
        raise ValueError(f"config.nonfinite={nonfinite!r}: use 'skip' or 'error'")
    max_bad = int(_get(config, "max_consecutive_nonfinite", 10))

    def save(step: int) -> None:
        meta = {"step": step, "data": train_it.state(), "loss": loss_name, "model": dataclasses.asdict(cfg),
                "lora_alpha": spec.lora_alpha, "seed": seed}
        ckpt.save(step, state, meta)

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=start, disable=progress_disabled(_get(config, "progress", None)),
               desc=f"train {loss_name}", dynamic_ncols=True)
    last: dict[str, float] = {}
    t_last, tok_since, bad_run = time.time(), 0, 0
    step = start
    if eval_every and start == 0 and bool(_get(config, "eval_at_start", True)):
        # Step 0: the starting model, before any update; `loss` is the first training batch's.
        m0 = {"loss": float(jax.device_get(make_eval_step(spec, mesh, rules, param_sh, frozen_sh, batch_sh)(
            state["params"], frozen, state["loss_state"], first))["loss"])}
        m0.update(evaluate())
        logger.write(0, m0)
        if on_step is not None:
            on_step(0, m0)
    try:
        pending = first
        while step < total_steps:
            batch, pending = pending, None
            if batch is None:
                batch = next(train_it)
            tok_since += _host_tokens(batch)
            state, metrics = step_fn(state, frozen, batch)
            step += 1
            if step % log_every == 0 or step == total_steps:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.time()
                m["tokens_per_s"] = tok_since / max(now - t_last, 1e-9)
                t_last, tok_since = now, 0
                if eval_every and (step % eval_every == 0 or step == total_steps):
                    m.update(evaluate())
                logger.write(step, m)  # logged before any error below, so the bad step is on record
                last = m
                bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
                if m["skipped"]:
                    bad_run += 1
                    msg = f"step {step}: non-finite loss/metrics/gradient; update skipped (params unchanged)"
                    note("tokax.train", msg)
                    if nonfinite == "error":
                        assert_finite(m["loss"], {k: v for k, v in m.items() if k != "tokens_per_s"}, step=step)
                        raise FloatingPointError(f"{msg}; gradient norm {m['grad_norm']}")
                    if bad_run >= max_bad:
                        raise FloatingPointError(f"{bad_run} consecutive non-finite steps up to step {step}; stopping")
                else:
                    bad_run = 0
                if on_step is not None:
                    on_step(step, m)
            bar.update(1)
            if step % ckpt_every == 0 and step < total_steps:
                save(step)
        if ckpt.latest_step() != step:
            save(step)
        ckpt.wait()
    finally:
        bar.close()
        logger.close()
        ckpt.close()
    out = dict(last)
    out.update({"step": float(step), "resumed_from": float(resumed) if resumed is not None else -1.0,
                "wall_s": time.time() - t_start, "nonfinite_steps": float(jax.device_get(state["nonfinite"]))})
    return out
