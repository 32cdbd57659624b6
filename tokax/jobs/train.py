"""Job: the training core (``configs/sft.py``, ``distill.py``, ``preference.py``,
``byte_ensemble.py``): checks every key of the config before anything is loaded,
then runs ``tokax.train.trainer.run`` and prints a closing summary (final
metrics, workdir, checkpoint) on stdout. The workdir is locked for the run and
remembers its config (``tokax.train.workdir``)."""

from __future__ import annotations

import inspect
import os

from tokax.errors import InputError
from tokax.jobs import ConfigError, check, check_progress

TOKENIZERS = ("spm", "bytes", "gemma3")
INITS = "'random', 'gemma3' or 'checkpoint:DIR' (a tokax training workdir)"


def _check_model(c, prefix: str) -> int:
    """``model`` / ``teacher`` keys; returns the number of layers of the model they describe."""
    from tokax.model.config import PRESETS

    m = c
    check(m.preset in PRESETS, f"{prefix}.preset", m.preset, f"use one of {', '.join(sorted(PRESETS))}")
    init = m.init
    check(isinstance(init, str) and (init in ("random", "gemma3") or init.startswith("checkpoint:")),
          f"{prefix}.init", init, f"use {INITS}")
    if init.startswith("checkpoint:"):
        d = init.partition(":")[2]
        check(os.path.isdir(os.path.join(d, "checkpoints")) and os.listdir(os.path.join(d, "checkpoints")),
              f"{prefix}.init", init, f"{d!r} holds no checkpoints/ of a tokax training run")
    check(m.dtype in ("float32", "bfloat16"), f"{prefix}.dtype", m.dtype, "use float32 or bfloat16")
    if "embed_init_std" in m:
        check(m.embed_init_std >= 0, f"{prefix}.embed_init_std", m.embed_init_std, "must be >= 0 (0: the decoder's 1.0)")
    over = dict(m.get("overrides", {}) or {})
    if init == "gemma3":
        check(m.preset == "gemma3-270m", f"{prefix}.preset", m.preset, "init='gemma3' loads Gemma 3 270M: use preset 'gemma3-270m'")
    for k, v in over.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("rms_eps",):
            check(v > 0, f"{prefix}.overrides.{k}", v, "must be > 0")
    try:
        cfg = PRESETS[m.preset](**{k: v for k, v in over.items()})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--config.{prefix}.overrides={over!r} is invalid: {e}") from e
    return cfg.n_layers


def _check_loss(c) -> None:
    from tokax.train.losses import LOSS_INFO, get_loss
    from tokax.train.trainer import SUPPORTED_LOSSES

    check(c.loss in SUPPORTED_LOSSES, "loss", c.loss, f"use one of {', '.join(SUPPORTED_LOSSES)}")
    params = inspect.signature(get_loss(c.loss)).parameters
    extra = set(LOSS_INFO[c.loss].extra_inputs)
    takes = sorted(k for k in params if k not in extra and k != "batch")
    for k, v in dict(c.get("loss_kwargs", {}) or {}).items():
        if v is None:  # a placeholder: the loss's default
            continue
        check(k in takes, f"loss_kwargs.{k}", v, f"loss {c.loss!r} has no hyperparameter {k!r}; it takes: "
              f"{', '.join(takes) or 'none'}")
        if isinstance(v, float) and v != v:
            continue  # NaN: the trainer's non-finite handling is tested with it


def check_examples_file(path: str, key: str) -> None:
    """A preference data file: JSONL, each line {prompt, chosen, rejected} or {prompt, completion, label}."""
    from tokax.data.preference import read_jsonl

    try:
        rows = read_jsonl(path)
    except InputError as e:
        raise ConfigError(f"--config.{key}: {e}") from e
    check(rows, key, path, "holds no examples (one JSON object per line)")
    for n, row in enumerate(rows):
        paired = {"prompt", "chosen", "rejected"} <= set(row)
        unpaired = {"prompt", "completion", "label"} <= set(row)
        if not (paired or unpaired):
            raise ConfigError(f"--config.{key}: {path}: example {n} (the {n + 1}th object) has fields {sorted(row)}; "
                              "each needs prompt, chosen, rejected (paired) or prompt, completion, label (unpaired)")


def validate(c) -> None:
    """Every key of a training config, with the fix, before any data or model is loaded."""
    check(isinstance(c.workdir, str) and c.workdir.strip(), "workdir", c.workdir, "give a directory")
    wd = os.path.expanduser(c.workdir)
    check(not os.path.exists(wd) or os.path.isdir(wd), "workdir", c.workdir, "is a file; give a directory")
    check(c.total_steps >= 1, "total_steps", c.total_steps, "must be >= 1 (optimizer updates)")
    _check_loss(c)
    n_layers = _check_model(c.model, "model")

    lc = c.get("lora")
    if lc is not None and lc.enabled:
        from tokax.model.lora import PROJECTIONS

        check(lc.rank >= 1, "lora.rank", lc.rank, "must be >= 1")
        check(lc.alpha > 0, "lora.alpha", lc.alpha, "must be > 0")
        check(len(lc.targets) >= 1 and all(t in PROJECTIONS for t in lc.targets), "lora.targets", tuple(lc.targets),
              f"choose a non-empty subset of {', '.join(PROJECTIONS)}")

    d = c.data
    check(d.tokenizer in TOKENIZERS, "data.tokenizer", d.tokenizer, f"use one of {', '.join(TOKENIZERS)}")
    if d.tokenizer == "spm":
        check(d.vocab_size >= 260, "data.vocab_size", d.vocab_size, "must be >= 260 (256 byte pieces + 4 specials)")
    check(c.model.init == "gemma3" and d.tokenizer == "gemma3" or c.model.init != "gemma3", "data.tokenizer",
          d.tokenizer, "model.init='gemma3' reads Gemma's own tokens: use data.tokenizer='gemma3'")
    check(d.seq_len >= 2, "data.seq_len", d.seq_len, "must be >= 2")
    check(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1 (sequences per optimizer step)")
    ga = d.get("grad_accum", 1)
    check(ga >= 1, "data.grad_accum", ga, "must be >= 1")
    check(d.batch_size % ga == 0, "data.batch_size", d.batch_size, f"must be a multiple of data.grad_accum={ga}")
    check(d.eval_batch_size >= 1, "data.eval_batch_size", d.eval_batch_size, "must be >= 1")
    if "piece_chars" in d:
        check(d.piece_chars >= 1, "data.piece_chars", d.piece_chars, "must be >= 1")
    if "max_files" in d:
        check(d.max_files >= 0, "data.max_files", d.max_files, "must be >= 0 (0 = the whole split)")
    check(d.bad_examples in ("error", "skip"), "data.bad_examples", d.bad_examples, "use 'error' or 'skip'")
    for key in ("path", "eval_path"):
        p = d.get(key, "")
        if p:
            check(os.path.isfile(p), f"data.{key}", p, "no such file (a JSONL file of preference examples)")
            check_examples_file(p, f"data.{key}")
    for key in ("n_examples", "n_eval_examples", "context_lines"):
        if key in d:
            check(d[key] >= 1, f"data.{key}", d[key], "must be >= 1")

    o = c.optimizer
    check(o.name in ("adamw", "sgd", "adafactor"), "optimizer.name", o.name, "use adamw, sgd or adafactor")
    check(o.lr > 0, "optimizer.lr", o.lr, "must be > 0 (a negative rate would ascend the loss)")
    check(o.schedule in ("constant", "cosine", "linear"), "optimizer.schedule", o.schedule,
          "use constant, cosine or linear")
    check(0 <= o.warmup_steps, "optimizer.warmup_steps", o.warmup_steps, "must be >= 0")
    check(0 <= o.final_lr_ratio <= 1, "optimizer.final_lr_ratio", o.final_lr_ratio, "must be in [0, 1]")
    check(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "must be >= 0")
    for b in ("b1", "b2"):
        if b in o:
            check(0 <= o[b] < 1, f"optimizer.{b}", o[b], "must be in [0, 1)")
    check(o.grad_clip >= 0, "optimizer.grad_clip", o.grad_clip, "must be >= 0 (0 disables)")

    mc = dict(c.mesh)
    rules = mc.pop("rules", None)
    del rules
    try:
        from tokax.train import sharding as shd

        shd.make_mesh(mc)
    except ValueError as e:
        raise ConfigError(f"--config.mesh={mc} is invalid: {e}") from e

    check(c.logprob_chunk >= 0, "logprob_chunk", c.logprob_chunk, "must be >= 0 (0: full softmax)")
    check(c.logprobs_impl in ("auto", "chunked_kernel"), "logprobs_impl", c.logprobs_impl, "use auto or chunked_kernel")
    check(c.nonfinite in ("skip", "error"), "nonfinite", c.nonfinite, "use skip or error")
    check(c.max_consecutive_nonfinite >= 1, "max_consecutive_nonfinite", c.max_consecutive_nonfinite, "must be >= 1")
    check(c.log_every >= 1, "log_every", c.log_every, "must be >= 1")
    check(c.eval_every >= 0, "eval_every", c.eval_every, "must be >= 0 (0: no evaluation)")
    check(c.eval_batches >= 1, "eval_batches", c.eval_batches, "must be >= 1")
    check(c.checkpoint_every >= 1, "checkpoint_every", c.checkpoint_every, "must be >= 1")
    check(c.keep_checkpoints >= 1, "keep_checkpoints", c.keep_checkpoints, "must be >= 1 (checkpoints kept)")
    check_progress(c)

    from tokax.train.losses import LOSS_INFO

    info = LOSS_INFO[c.loss]
    head_vocab = c.get("head_vocab", 0) or 0
    check(head_vocab >= 0, "head_vocab", head_vocab, "must be >= 0 (0: the full vocabulary)")
    check(not head_vocab or info.head_subset, "head_vocab", head_vocab,
          f"a draft head over the most frequent tokens is a distillation option; loss={c.loss!r} does not use it")
    if info.needs_teacher:
        check("teacher" in c, "teacher", None, f"loss={c.loss!r} needs a teacher block (configs/distill.py)")
        t_layers = _check_model(c.teacher, "teacher")
        layers = tuple(c.model.get("from_teacher_layers", ()) or ())
        check(all(0 <= int(i) < t_layers for i in layers), "model.from_teacher_layers", layers,
              f"layer indices must be in [0, {t_layers}) (the teacher's layers)")
    del n_layers


def run(c) -> dict:
    """Validate, train, print the closing summary; returns the trainer's final metrics."""
    from tokax.train import data as data_lib
    from tokax.train.trainer import run as train

    validate(c)
    try:
        out = train(c)
    except data_lib.BadExampleError as e:
        src = c.data.get("path", "") or "the built code preference task"
        raise InputError(f"{src}: {e} (--config.data.bad_examples=skip skips such examples)") from e
    summary(c, out)
    return out


def summary(c, out: dict) -> None:
    """The closing lines on stdout: steps, time, final train and eval metrics, where it all is."""
    workdir = os.path.abspath(os.path.expanduser(c.workdir))
    step = int(out.get("step", 0))
    head = f"trained {c.loss} to step {step}/{c.total_steps} in {out.get('wall_s', 0.0):.1f}s"
    if out.get("resumed_from", -1) >= 0:
        head += f" (resumed from step {int(out['resumed_from'])})"
    if int(out.get("nonfinite_steps", 0)):
        head += f", {int(out['nonfinite_steps'])} non-finite step(s) skipped"
    keys = [k for k in ("loss", "grad_norm", "rewards/accuracies", "rewards/margins", "kl_ref") if k in out]
    keys += sorted(k for k in out if k.startswith("eval/"))
    print(head)
    if keys:
        print("  final: " + ", ".join(f"{k} {out[k]:.4g}" for k in keys if out[k] is not None))
    elif out.get("resumed_from", -1) == step:
        print(f"  nothing to train: the workdir's run had already reached total_steps={c.total_steps}")
    print(f"  workdir: {workdir} (metrics.jsonl, config.json{', tb/' if c.get('tensorboard', True) else ''})")
    print(f"  checkpoint: {os.path.join(workdir, 'checkpoints', str(step))}")
