"""The trainer: train state, one jitted sharded train step, eval, logging, checkpoints, resume.

    from tokax.train.trainer import run
    final_metrics = run(config)          # config from configs/{sft,distill,preference}.py

One step (``make_train_step``) is a single ``jax.jit`` with ``in_shardings``
and ``out_shardings`` over the config's mesh:

    for each micro-batch a = 1..A (gradient accumulation, ``lax.scan``):
        hidden  = decoder(params, tokens)                       # [b, T, D]
        logp_t  = log softmax(hidden @ E^T)[target_t]           # chunked over V
        loss_a, metrics_a = LOSSES[name](batch built from logp_t, masks, ref / teacher terms)
        g_a     = d loss_a / d trainable
    g = sum_a w_a g_a / sum_a w_a      (w_a = loss tokens for token losses, examples otherwise,
                                        so accumulation equals one big batch for SFT's token mean)
    ok = loss, metrics and |g| finite
    params, opt_state = optax update if ok else unchanged        (a bad step is skipped, counted)

With LoRA the trainable tree is the adapters alone; the frozen base is an
input of the step and the policy's weights are ``lora_merge(base, adapters)``
inside the loss, so gradients and optimizer state exist only for the
adapters and the reference model of DPO-style losses is the base itself.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tokax.console import note, progress_disabled
from tokax.model import lora as lora_lib
from tokax.model.config import PRESETS, ModelConfig
from tokax.model.decoder import forward, init_params
from tokax.train import data as data_lib
from tokax.train import sharding as shd
from tokax.train.checkpoint import Checkpointer, abstract_state, restore_params
from tokax.train.workdir import WorkdirError, WorkdirLock, check_checkpoint_meta, check_config, save_config
from tokax.train.logprobs import sequence_logprobs, token_kl, token_logprobs
from tokax.train.losses import (
    LOSS_INFO,
    PreferenceBatch,
    RunningMean,
    TokenBatch,
    UnpairedBatch,
    assert_finite,
    check_finite,
    get_loss,
    kto_kl_estimate,
    update_running_mean,
)
from tokax.train.losses.bco import bco_rewards
from tokax.train.losses.treg import contrastive_token_rewards

__all__ = [
    "StepSpec",
    "build_optimizer",
    "make_loss_fn",
    "make_train_step",
    "make_eval_step",
    "init_train_state",
    "MetricsLogger",
    "EventWriter",
    "run",
]

log = logging.getLogger("tokax.train")

Params = Any
SUPPORTED_LOSSES = ("sft", "distill", "dpo", "cdpo", "robust_dpo", "ipo", "hinge", "simpo", "orpo",
                    "kto", "bco", "tdpo1", "tdpo2", "treg")

# T-REG's contrastive prompts (Zhou et al. 2024) for the shipped code-continuation task: the
# reference scores each response token after an instruction to write better / worse code.
DEFAULT_BETTER_PREFIX = "# Continue the function below with its correct, idiomatic next line of Python.\n"
DEFAULT_WORSE_PREFIX = "# Continue the function below with a wrong, garbled or unrelated line of Python.\n"


# ----------------------------------------------------------------------------
# optimizer and schedule
# ----------------------------------------------------------------------------


def build_schedule(opt: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Learning rate of the n-th update (n = 1..total_steps): linear warmup ``lr * n / warmup_steps``
    (so the first update already moves, at ``lr / warmup_steps``), then 'constant', 'cosine' or
    'linear' decay reaching ``lr * final_lr_ratio`` at ``n = total_steps``. ``s(0) = 0`` is the
    (never used) value before the first update; the optimizer calls it as ``s(count + 1)``."""
    lr, warm = float(opt["lr"]), int(opt.get("warmup_steps", 0))
    end = lr * float(opt.get("final_lr_ratio", 0.0))
    kind = opt.get("schedule", "cosine")
    decay_steps = max(1, int(total_steps) - warm)
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    elif kind == "linear":
        after = optax.linear_schedule(lr, end, decay_steps)
    else:
        raise ValueError(f"optimizer.schedule={kind!r}: use 'constant', 'cosine' or 'linear'")
    if warm <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def build_optimizer(opt: Mapping[str, Any], total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """optax chain from the config: optional global-norm clipping, then adamw / sgd / adafactor.

    Weight decay (decoupled, AdamW) applies to matrices only (ndim >= 2), not
    to norm scales.
    """
    sched = build_schedule(opt, total_steps)
    # optax counts updates from 0; our schedule is indexed by the update's 1-based step number.
    opt_sched = lambda count: sched(count + 1)  # noqa: E731
    name = opt.get("name", "adamw")
    wd = float(opt.get("weight_decay", 0.0))
    decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # noqa: E731
    if name == "adamw":
        core = optax.adamw(opt_sched, b1=float(opt.get("b1", 0.9)), b2=float(opt.get("b2", 0.999)),
                           eps=float(opt.get("eps", 1e-8)), weight_decay=wd, mask=decay_mask)
    elif name == "sgd":
        core = optax.sgd(opt_sched, momentum=float(opt.get("momentum", 0.0)) or None)
    elif name == "adafactor":
        core = optax.adafactor(opt_sched, weight_decay_rate=wd or None)
    else:
        raise ValueError(f"optimizer.name={name!r}: use 'adamw', 'sgd' or 'adafactor'")
    clip = float(opt.get("grad_clip", 0.0))
    tx = optax.chain(optax.clip_by_global_norm(clip), core) if clip > 0 else core
    return tx, sched


# ----------------------------------------------------------------------------
# the loss of one micro-batch
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about a train step (hashable; part of the jit cache key)."""

    model: ModelConfig
    loss: str
    loss_kwargs: tuple[tuple[str, Any], ...] = ()
    lora_alpha: float | None = None  # None: full fine-tuning
    teacher: ModelConfig | None = None  # distillation
    logprob_chunk: int | None = None  # vocabulary chunk of the log-prob / KL kernels; None: full softmax
    log_ref_kl: bool = True  # log KL(pi_ref || pi) on completion tokens (reference losses)
    logprobs_impl: str = "auto"  # 'auto' (chunked scan if logprob_chunk else full) | 'chunked_kernel' (Pallas)
    # T-REG: token ids (no BOS) of the "better" and "worse" instructions inserted after BOS,
    # before the prompt, when the reference scores the responses for token-level rewards.
    contrastive_prefixes: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    def __post_init__(self):
        if self.loss not in SUPPORTED_LOSSES:
            raise ValueError(
                f"loss={self.loss!r} is not supported by the trainer; choose one of {list(SUPPORTED_LOSSES)}"
            )
        if self.loss == "treg" and (self.contrastive_prefixes is None or not all(self.contrastive_prefixes)):
            raise ValueError("loss='treg' needs contrastive_prefixes=(better_ids, worse_ids), both non-empty")
        if self.logprobs_impl not in ("auto", "chunked_kernel"):
            raise ValueError(f"logprobs_impl={self.logprobs_impl!r}: use 'auto' or 'chunked_kernel'")
        if self.loss == "distill" and self.teacher is None:
            raise ValueError("loss='distill' needs a teacher model config (config.teacher)")

    @property
    def info(self):
        return LOSS_INFO[self.loss]


def _policy(spec: StepSpec, trainable: Params, frozen: Mapping[str, Any]) -> Params:
    if spec.lora_alpha is None:
        return trainable
    return lora_lib.lora_merge(frozen["base"], trainable, spec.lora_alpha)


def _reference(spec: StepSpec, trainable: Params, frozen: Mapping[str, Any]) -> Params:
    # LoRA: the reference is the frozen base, no copy. Full fine-tuning: a frozen copy.
    return frozen["base"] if spec.lora_alpha is not None else frozen["ref"]


def _hidden(cfg: ModelConfig, params: Params, tokens, positions, segment_ids=None, mesh=None, rules=()):
    with shd.mesh_context(mesh):  # attention_impl='ring' finds the mesh's `sequence` axis here
        _, hidden, _ = forward(cfg, params, tokens, positions, return_logits=False, segment_ids=segment_ids)
    return shd.constrain(hidden, ("batch", "length", "act_embed"), mesh, rules)  # [B, T, D]


def make_loss_fn(spec: StepSpec, mesh=None, rules=()) -> Callable:
    """``loss_fn(trainable, frozen, mb, loss_state) -> (loss, (metrics, weight, new_loss_state))``
    for one micro-batch ``mb`` (dict of ``[b, ...]`` arrays)."""
    fn = get_loss(spec.loss)
    kw = dict(spec.loss_kwargs)
    kind = spec.info.kind
    cfg = spec.model
    chunk = spec.logprob_chunk

    def lp_of(params, hidden, targets, return_lse=False):
        if spec.logprobs_impl == "chunked_kernel":  # Pallas kernel (interpret mode on CPU)
            from tokax.kernels.logprobs import chunked_logprobs

            emb = params["embed"]
            tgt = jnp.clip(targets, 0, cfg.vocab_size - 1)
            lp = chunked_logprobs(hidden, emb, tgt, chunk_size=chunk or 128)
            if not return_lse:
                return lp
            # log p(t) = logit_t - lse, and logit_t is one row of the embedding: no [V] pass needed.
            logit_t = jnp.einsum("btd,btd->bt", hidden.astype(jnp.float32), jnp.take(emb, tgt, axis=0).astype(jnp.float32))
            return lp, logit_t - lp
        return token_logprobs(hidden, params["embed"], targets, chunk_size=chunk, return_lse=return_lse)

    def token_loss(trainable, frozen, mb, loss_state):
        params = _policy(spec, trainable, frozen)
        h = _hidden(cfg, params, mb["tokens"], mb["positions"], mb["segment_ids"], mesh, rules)
        mask = mb["mask"]
        ids = frozen.get("head_ids")  # distillation into a frequent-token draft head (config.head_vocab)
        if spec.loss == "sft":
            lp, lse = lp_of(params, h, mb["targets"], return_lse=True)
            batch = TokenBatch(mask=mask, token_logps=lp, lse=lse)
        else:  # distill: KL(teacher || student) per position
            t = frozen["teacher"]
            th = jax.lax.stop_gradient(_hidden(spec.teacher, t, mb["tokens"], mb["positions"], mb["segment_ids"], mesh, rules))
            emb, t_emb = params["embed"], jax.lax.stop_gradient(t["embed"])
            if ids is not None:
                # Draft head over a frequent-token subset S: both distributions are taken
                # conditional on S (the draft can only ever propose tokens of S).
                emb, t_emb = jnp.take(emb, ids, axis=0), jnp.take(t_emb, ids, axis=0)
            kl = token_kl(h, emb, th, t_emb, chunk_size=chunk)
            lp = lp_of(params, h, mb["targets"]) if kw.get("sft_weight") else None
            batch = TokenBatch(mask=mask, token_logps=lp, token_kl=kl)
        loss, metrics = fn(batch, **kw)
        if spec.loss == "distill" and ids is not None:
            # Greedy agreement on S: the fraction of positions where a greedy draft would be accepted
            # (when the teacher's argmax lies in S). Cheap here: |S| logits per position.
            s_top = jnp.argmax(jnp.einsum("btd,vd->btv", h, emb.astype(h.dtype)), -1)
            t_top = jnp.argmax(jnp.einsum("btd,vd->btv", th, t_emb.astype(th.dtype)), -1)
            agree = jnp.sum(jnp.where(mask, s_top == t_top, False)) / jnp.maximum(jnp.sum(mask), 1)
            metrics = dict(metrics, top1_agree=jax.lax.stop_gradient(agree.astype(jnp.float32)))
        return loss, (metrics, jnp.sum(mask).astype(jnp.float32), loss_state)

    def contrastive_logps(ref, tokens, targets, positions, prefix):
        """Reference log-probs of the same targets with ``prefix`` inserted after BOS: [N, T],
        aligned with ``targets`` (sequences are ``[bos] + prompt + completion``, positions -1 on padding)."""
        n, pl = tokens.shape[0], len(prefix)
        pre = jnp.broadcast_to(jnp.asarray(prefix, tokens.dtype)[None, :], (n, pl))
        c_tok = jnp.concatenate([tokens[:, :1], pre, tokens[:, 1:]], axis=1)  # [N, T+P]
        c_pos = jnp.concatenate([positions[:, :1], jnp.broadcast_to(jnp.arange(1, pl + 1, dtype=positions.dtype), (n, pl)),
                                 jnp.where(positions[:, 1:] >= 0, positions[:, 1:] + pl, -1)], axis=1)
        c_tgt = jnp.concatenate([jnp.zeros((n, pl), targets.dtype), targets], axis=1)  # c_tgt[:, P + t] = targets[:, t]
        ch = _hidden(cfg, ref, c_tok, c_pos, None, mesh, rules)
        return jax.lax.stop_gradient(lp_of(ref, ch, c_tgt)[:, pl:])

    def seq_terms(trainable, frozen, tokens, targets, positions, mask):
        """Policy (and reference) sequence log-prob sums, counts, and per-token KL(ref || pi)."""
        params = _policy(spec, trainable, frozen)
        h = _hidden(cfg, params, tokens, positions, None, mesh, rules)
        lp = lp_of(params, h, targets)
        logps, counts = sequence_logprobs(lp, mask)
        out = {"logps": logps, "counts": counts}
        if spec.info.needs_reference:
            ref = jax.lax.stop_gradient(_reference(spec, trainable, frozen))
            rh = jax.lax.stop_gradient(_hidden(cfg, ref, tokens, positions, None, mesh, rules))
            ref_lp = lp_of(ref, rh, targets)
            out["ref_logps"], _ = sequence_logprobs(ref_lp, mask)
            if spec.loss == "treg":
                better, worse = spec.contrastive_prefixes
                out["token_logratios"] = lp - ref_lp  # [N, T] (gradient through lp)
                out["token_rewards"] = contrastive_token_rewards(
                    contrastive_logps(ref, tokens, targets, positions, better),
                    contrastive_logps(ref, tokens, targets, positions, worse), mask)
            if spec.loss in ("tdpo1", "tdpo2") or spec.log_ref_kl:
                grad_kl = spec.loss in ("tdpo1", "tdpo2")
                hk = h if grad_kl else jax.lax.stop_gradient(h)
                ek = params["embed"] if grad_kl else jax.lax.stop_gradient(params["embed"])
                tkl = token_kl(hk, ek, rh, ref["embed"], chunk_size=chunk)  # [B, T]
                out["kl"], _ = sequence_logprobs(tkl, mask)
        return out

    def paired_loss(trainable, frozen, mb, loss_state):
        b = mb["chosen_tokens"].shape[0]
        cat = lambda k: jnp.concatenate([mb[f"chosen_{k}"], mb[f"rejected_{k}"]], axis=0)  # noqa: E731
        o = seq_terms(trainable, frozen, cat("tokens"), cat("targets"), cat("positions"), cat("mask"))
        c, r = (lambda x: x[:b]), (lambda x: x[b:])
        fields = dict(chosen_logps=c(o["logps"]), rejected_logps=r(o["logps"]),
                      chosen_counts=c(o["counts"]), rejected_counts=r(o["counts"]))
        if "ref_logps" in o:
            fields.update(ref_chosen_logps=c(o["ref_logps"]), ref_rejected_logps=r(o["ref_logps"]))
        if "kl" in o:
            fields.update(chosen_kl=c(o["kl"]), rejected_kl=r(o["kl"]))
        if "token_rewards" in o:
            m = cat("mask")
            fields.update(chosen_token_logratios=c(o["token_logratios"]), rejected_token_logratios=r(o["token_logratios"]),
                          chosen_token_rewards=c(o["token_rewards"]), rejected_token_rewards=r(o["token_rewards"]),
                          chosen_mask=c(m), rejected_mask=r(m))
        loss, metrics = fn(PreferenceBatch(**fields), **kw)
        metrics = dict(metrics)
        if "kl" in o:
            # KL(pi_ref || pi) per completion token, the drift the analysis papers watch
            metrics["kl_ref"] = jax.lax.stop_gradient(jnp.sum(o["kl"]) / jnp.maximum(jnp.sum(o["counts"]), 1.0))
        return loss, (metrics, jnp.asarray(b, jnp.float32), loss_state)

    def unpaired_loss(trainable, frozen, mb, loss_state):
        b = mb["tokens"].shape[0]
        if spec.loss == "kto":  # one forward over the examples and KTO's mismatched pairs
            cat = lambda k: jnp.concatenate([mb[k], mb["kl_" + k]], axis=0)  # noqa: E731
            o = seq_terms(trainable, frozen, cat("tokens"), cat("targets"), cat("positions"), cat("mask"))
        else:
            o = seq_terms(trainable, frozen, mb["tokens"], mb["targets"], mb["positions"], mb["mask"])
        first = lambda x: x[:b]  # noqa: E731
        batch = UnpairedBatch(logps=first(o["logps"]), ref_logps=first(o["ref_logps"]),
                              counts=first(o["counts"]), desirable=mb["desirable"])
        extra = {}
        new_state = loss_state
        if spec.loss == "kto":
            extra["kl_estimate"] = kto_kl_estimate(o["logps"][b:], o["ref_logps"][b:])
        else:  # BCO: fold this batch's rewards into the running mean first (TRL's order)
            rm = RunningMean(loss_state["bco_mean"], loss_state["bco_count"])
            rm = update_running_mean(rm, bco_rewards(batch, beta=kw.get("beta", 0.1)))
            new_state = {"bco_mean": rm.mean, "bco_count": rm.count}
            extra["delta"] = rm.mean
        loss, metrics = fn(batch, **extra, **kw)
        metrics = dict(metrics)
        if "kl" in o:
            metrics["kl_ref"] = jax.lax.stop_gradient(jnp.sum(o["kl"][:b]) / jnp.maximum(jnp.sum(o["counts"][:b]), 1.0))
        return loss, (metrics, jnp.asarray(b, jnp.float32), new_state)

    return {"token": token_loss, "paired": paired_loss, "unpaired": unpaired_loss}[kind]


def init_loss_state(spec: StepSpec) -> dict[str, jax.Array]:
    if spec.loss == "bco":
        rm = RunningMean.init()
        return {"bco_mean": rm.mean, "bco_count": rm.count}
    return {}


# ----------------------------------------------------------------------------
# the train step
# ----------------------------------------------------------------------------


def init_train_state(spec: StepSpec, trainable: Params, tx: optax.GradientTransformation) -> dict[str, Any]:
    """``{'step', 'params' (trainable), 'opt_state', 'loss_state', 'nonfinite'}``."""
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": trainable,
        "opt_state": tx.init(trainable),
        "loss_state": init_loss_state(spec),
        "nonfinite": jnp.zeros((), jnp.int32),
    }


def _train_step_fn(spec: StepSpec, tx, schedule, mesh, rules):
    loss_fn = make_loss_fn(spec, mesh, rules)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, frozen, batch):
        A = jax.tree.leaves(batch)[0].shape[0]
        params = state["params"]
        if A == 1:
            mb = jax.tree.map(lambda x: x[0], batch)
            (loss, (metrics, w, loss_state)), grads = grad_fn(params, frozen, mb, state["loss_state"])
        else:
            def micro(carry, mb):
                g_acc, l_acc, m_acc, w_acc, ls = carry
                (l, (m, w, ls)), g = grad_fn(params, frozen, mb, ls)
                g_acc = jax.tree.map(lambda a, x: a + w * x.astype(jnp.float32), g_acc, g)
                m_acc = jax.tree.map(lambda a, x: a + w * x, m_acc, m)
                return (g_acc, l_acc + w * l, m_acc, w_acc + w, ls), None

            mb0 = jax.tree.map(lambda x: x[0], batch)
            _, (m_shape, _, _) = jax.eval_shape(loss_fn, params, frozen, mb0, state["loss_state"])
            zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
            init = (zeros_g, jnp.zeros((), jnp.float32), zeros_m, jnp.zeros((), jnp.float32), state["loss_state"])
            (g_sum, l_sum, m_sum, w, loss_state), _ = jax.lax.scan(micro, init, batch)
            den = jnp.maximum(w, 1e-12)
            grads = jax.tree.map(lambda g, p: (g / den).astype(p.dtype), g_sum, params)
            loss = l_sum / den
            metrics = jax.tree.map(lambda m: m / den, m_sum)
        gnorm = optax.tree.norm(grads)
        ok = check_finite(loss, metrics) & jnp.isfinite(gnorm)
        updates, new_opt = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        new_state = {
            "step": state["step"] + 1,
            "params": keep(new_params, params),
            "opt_state": keep(new_opt, state["opt_state"]),
            "loss_state": keep(loss_state, state["loss_state"]),
            "nonfinite": state["nonfinite"] + (~ok).astype(jnp.int32),
        }
        out = {"loss": loss, "grad_norm": gnorm, "lr": schedule(state["step"] + 1),
               "skipped": (~ok).astype(jnp.float32), **{k: v for k, v in metrics.items()}}
        if spec.info.kind == "token":
            out["tokens"] = w
        return new_state, out

    return step


def make_train_step(spec: StepSpec, tx, schedule, mesh, rules, state_sh, frozen_sh, batch_sh) -> Callable:
    """``step(state, frozen, batch) -> (state, metrics)`` as one ``jax.jit`` with shardings."""
    fn = _train_step_fn(spec, tx, schedule, mesh, rules)
    donate = (0,) if jax.default_backend() != "cpu" else ()  # CPU cannot reuse donated buffers
    return jax.jit(fn, in_shardings=(state_sh, frozen_sh, batch_sh),
                   out_shardings=(state_sh, shd.replicated(mesh)), donate_argnums=donate)


def make_eval_step(spec: StepSpec, mesh, rules, params_sh, frozen_sh, batch_sh) -> Callable:
    """``eval(trainable, frozen, loss_state, batch) -> metrics`` (mean over micro-batches, no update)."""
    loss_fn = make_loss_fn(spec, mesh, rules)

    def ev(params, frozen, loss_state, batch):
        def micro(carry, mb):
            l_acc, m_acc, w_acc = carry
            l, (m, w, _) = loss_fn(params, frozen, mb, loss_state)
            return (l_acc + w * l, jax.tree.map(lambda a, x: a + w * x, m_acc, m), w_acc + w), None

        mb0 = jax.tree.map(lambda x: x[0], batch)
        _, (m_shape, _, _) = jax.eval_shape(loss_fn, params, frozen, mb0, loss_state)
        zm = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
        (l, m, w), _ = jax.lax.scan(micro, (jnp.zeros(()), zm, jnp.zeros(())), batch)
        den = jnp.maximum(w, 1e-12)
        return {"loss": l / den, **jax.tree.map(lambda x: x / den, m)}

    return jax.jit(ev, in_shardings=(params_sh, frozen_sh, shd.replicated(mesh), batch_sh),
                   out_shardings=shd.replicated(mesh))


# ----------------------------------------------------------------------------
# logging: JSONL + TensorBoard event files
# ----------------------------------------------------------------------------


def _crc32c_table() -> list[int]:
    poly, table = 0x82F63B78, []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field_bytes(num: int, payload: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


class EventWriter:
    """TensorBoard scalars without TensorFlow: a TFRecord file of ``Event`` protos, hand-encoded.

    Event {double wall_time = 1; int64 step = 2; string file_version = 3;
    Summary summary = 5}, Summary {repeated Value value = 1}, Value {string
    tag = 1; float simple_value = 2}; each record is framed as
    ``len (u64) | masked_crc32c(len) | data | masked_crc32c(data)``.
    """

    def __init__(self, logdir: str) -> None:
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._f = open(self.path, "ab")
        self._write(self._event(time.time(), 0, file_version=b"brain.Event:2"))

    @staticmethod
    def _event(wall: float, step: int, file_version: bytes | None = None, summary: bytes | None = None) -> bytes:
        ev = b"\x09" + struct.pack("<d", wall) + b"\x10" + _varint(int(step))
        if file_version is not None:
            ev += _field_bytes(3, file_version)
        if summary is not None:
            ev += _field_bytes(5, summary)
        return ev

    def _write(self, data: bytes) -> None:
        head = struct.pack("<Q", len(data))
        self._f.write(head + struct.pack("<I", _masked_crc(head)) + data + struct.pack("<I", _masked_crc(data)))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        summ = b"".join(
            _field_bytes(1, _field_bytes(1, k.encode()) + b"\x15" + struct.pack("<f", float(v)))
            for k, v in values.items()
        )
        self._write(self._event(time.time(), step, summary=summ))
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_events(path: str) -> list[tuple[int, dict[str, float]]]:
    """Parse an ``EventWriter`` file back (checks both CRCs); for tests and quick looks."""
    out = []
    with open(path, "rb") as f:
        buf = f.read()
    i = 0
    while i < len(buf):
        head = buf[i : i + 8]
        (n,) = struct.unpack("<Q", head)
        if struct.unpack("<I", buf[i + 8 : i + 12])[0] != _masked_crc(head):
            raise ValueError(f"bad length crc at byte {i}")
        data = buf[i + 12 : i + 12 + n]
        if struct.unpack("<I", buf[i + 12 + n : i + 16 + n])[0] != _masked_crc(data):
            raise ValueError(f"bad data crc at byte {i}")
        i += 16 + n
        step, vals = _parse_event(data)
        if vals:
            out.append((step, vals))
    return out


def _read_varint(b: bytes, i: int) -> tuple[int, int]:
    shift = n = 0
    while True:
        x = b[i]
        n |= (x & 0x7F) << shift
        i += 1
        if not x & 0x80:
            return n, i
        shift += 7


def _fields(b: bytes):
    i = 0
    while i < len(b):
        key, i = _read_varint(b, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _read_varint(b, i)
        elif wt == 1:
            v, i = b[i : i + 8], i + 8
        elif wt == 5:
            v, i = b[i : i + 4], i + 4
        elif wt == 2:
            n, i = _read_varint(b, i)
            v, i = b[i : i + n], i + n
        else:
            raise ValueError(f"unsupported wire type {wt}")
        yield num, v


def _parse_event(data: bytes) -> tuple[int, dict[str, float]]:
    step, vals = 0, {}
    for num, v in _fields(data):
        if num == 2:
            step = v
        elif num == 5:
            for _, val in _fields(v):
                tag, x = None, None
                for vn, vv in _fields(val):
                    if vn == 1:
                        tag = vv.decode()
                    elif vn == 2:
                        x = struct.unpack("<f", vv)[0]
                if tag is not None:
                    vals[tag] = x
    return step, vals


class MetricsLogger:
    """Appends one JSON object per logged step to ``workdir/metrics.jsonl`` and
    the same scalars to a TensorBoard event file under ``workdir/tb``."""

    def __init__(self, workdir: str, tensorboard: bool = True) -> None:
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = EventWriter(os.path.join(workdir, "tb")) if tensorboard else None

    def truncate_after(self, step: int) -> None:
        """Drop entries logged after ``step`` (a run resumed from an earlier checkpoint redoes them)."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            rows = [ln for ln in f if ln.strip()]
        keep = [ln for ln in rows if json.loads(ln).get("step", 0) <= step]
        if len(keep) != len(rows):
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, self.path)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        row = {"step": int(step), **{k: _num(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            self.tb.scalars(step, {k: v for k, v in row.items() if k != "step" and v is not None and math.isfinite(v)})

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _num(v: Any) -> float | None:
    x = float(np.asarray(v))
    return x if math.isfinite(x) else None  # JSON has no NaN / inf


# ----------------------------------------------------------------------------
# run(config)
# ----------------------------------------------------------------------------


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
        pieces = data_lib.corpus_pieces(split, int(_get(dc, "piece_chars", 2000)), _get(dc, "max_files") or None)
        it = data_lib.PackedTextIterator(pieces, tok, seq_len, bs if train else int(_get(dc, "eval_batch_size", bs)),
                                         ga if train else 1, seed, state, shuffle=train)
        return it, []
    path = _get(dc, "path" if train else "eval_path", "") or ""
    if not path:
        n = int(_get(dc, "n_examples" if train else "n_eval_examples", 2000 if train else 256))
        ctx = int(_get(dc, "context_lines", 8))
        path = os.path.join(workdir, "data", f"code_pref_{split}_{n}_c{ctx}_s{seed}.jsonl")
        if not os.path.exists(path):
            rows = data_lib.build_code_preference_task(split, n=n, seed=seed, context_lines=ctx)
            data_lib.write_jsonl(path, rows)
    rows = data_lib.read_jsonl(path)
    policy = _get(dc, "bad_examples", "error")
    ebs = bs if train else int(_get(dc, "eval_batch_size", bs))
    if kind == "paired":
        pairs, skipped = data_lib.encode_preference(rows, tok, seq_len, policy)
        it = data_lib.PreferenceIterator(pairs, seq_len, ebs, ga if train else 1, seed, state, shuffle=train)
    else:
        if rows and "completion" not in rows[0]:
            rows = data_lib.preference_to_unpaired(rows)
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
    if loss_name == "distill":
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
    if loss_name == "treg":
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
        if loss_name != "distill":
            raise ValueError(f"config.head_vocab={head_vocab} is a distillation option (a draft head over the "
                             f"most frequent tokens); loss={loss_name!r} does not use it")
        ids_path = os.path.join(workdir, "head_ids.npy")
        if os.path.exists(ids_path):  # resume: the same subset the checkpoint was trained on
            ids = np.load(ids_path)
        else:
            ids = data_lib.frequent_token_ids(tok, head_vocab, split="train", max_files=int(_get(dc, "max_files", 0)))
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
