"""The train step: the loss of one micro-batch, gradient accumulation, the update, eval.

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

What a loss needs beyond its batch (a teacher, KTO's mismatched pairs, BCO's
running mean, T-REG's contrastive rewards, TDPO's KL with gradient, a head
over a token subset) is read from its ``LossInfo`` declaration
(``tokax.train.losses.LOSS_INFO``), never from its name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from tokax.model import lora as lora_lib
from tokax.model.config import ModelConfig
from tokax.model.decoder import forward
from tokax.train import sharding as shd
from tokax.train.logprobs import sequence_logprobs, token_kl, token_logprobs
from tokax.train.losses import (
    LOSS_INFO,
    PreferenceBatch,
    RunningMean,
    TokenBatch,
    UnpairedBatch,
    check_finite,
    get_loss,
    kto_kl_estimate,
    update_running_mean,
)
from tokax.train.losses.bco import bco_rewards
from tokax.train.losses.treg import contrastive_token_rewards

__all__ = [
    "SUPPORTED_LOSSES",
    "StepSpec",
    "make_loss_fn",
    "init_loss_state",
    "init_train_state",
    "make_train_step",
    "make_eval_step",
]

Params = Any
SUPPORTED_LOSSES = ("sft", "distill", "dpo", "cdpo", "robust_dpo", "ipo", "hinge", "simpo", "orpo",
                    "kto", "bco", "tdpo1", "tdpo2", "treg")


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
    teacher: ModelConfig | None = None  # losses that declare needs_teacher (distillation)
    logprob_chunk: int | None = None  # vocabulary chunk of the log-prob / KL kernels; None: full softmax
    log_ref_kl: bool = True  # log KL(pi_ref || pi) on completion tokens (reference losses)
    logprobs_impl: str = "auto"  # 'auto' (chunked scan if logprob_chunk else full) | 'chunked_kernel' (Pallas)
    # Losses that declare needs_contrastive_rewards (T-REG): token ids (no BOS) of the "better" and
    # "worse" instructions inserted after BOS, before the prompt, when the reference scores the
    # responses for token-level rewards.
    contrastive_prefixes: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    def __post_init__(self):
        if self.loss not in SUPPORTED_LOSSES:
            raise ValueError(
                f"loss={self.loss!r} is not supported by the trainer; choose one of {list(SUPPORTED_LOSSES)}"
            )
        info = self.info
        if info.needs_contrastive_rewards and (self.contrastive_prefixes is None or not all(self.contrastive_prefixes)):
            raise ValueError(f"loss={self.loss!r} needs contrastive_prefixes=(better_ids, worse_ids), both non-empty")
        if self.logprobs_impl not in ("auto", "chunked_kernel"):
            raise ValueError(f"logprobs_impl={self.logprobs_impl!r}: use 'auto' or 'chunked_kernel'")
        if info.needs_teacher and self.teacher is None:
            raise ValueError(f"loss={self.loss!r} needs a teacher model config (config.teacher)")

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
    info = spec.info
    kind = info.kind
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
        ids = frozen.get("head_ids")  # a frequent-token draft head (config.head_vocab; info.head_subset)
        if not info.needs_teacher:  # SFT: NLL of the targets, and log Z for the z-loss
            lp, lse = lp_of(params, h, mb["targets"], return_lse=True)
            batch = TokenBatch(mask=mask, token_logps=lp, lse=lse)
        else:  # distillation: KL(teacher || student) per position
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
        if info.head_subset and ids is not None:
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
        if info.needs_reference:
            ref = jax.lax.stop_gradient(_reference(spec, trainable, frozen))
            rh = jax.lax.stop_gradient(_hidden(cfg, ref, tokens, positions, None, mesh, rules))
            ref_lp = lp_of(ref, rh, targets)
            out["ref_logps"], _ = sequence_logprobs(ref_lp, mask)
            if info.needs_contrastive_rewards:
                better, worse = spec.contrastive_prefixes
                out["token_logratios"] = lp - ref_lp  # [N, T] (gradient through lp)
                out["token_rewards"] = contrastive_token_rewards(
                    contrastive_logps(ref, tokens, targets, positions, better),
                    contrastive_logps(ref, tokens, targets, positions, worse), mask)
            if info.needs_kl_grad or spec.log_ref_kl:
                grad_kl = info.needs_kl_grad
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
        if info.needs_kl_pairs:  # one forward over the examples and KTO's mismatched pairs
            cat = lambda k: jnp.concatenate([mb[k], mb["kl_" + k]], axis=0)  # noqa: E731
            o = seq_terms(trainable, frozen, cat("tokens"), cat("targets"), cat("positions"), cat("mask"))
        else:
            o = seq_terms(trainable, frozen, mb["tokens"], mb["targets"], mb["positions"], mb["mask"])
        first = lambda x: x[:b]  # noqa: E731
        batch = UnpairedBatch(logps=first(o["logps"]), ref_logps=first(o["ref_logps"]),
                              counts=first(o["counts"]), desirable=mb["desirable"])
        extra = {}
        new_state = loss_state
        if info.needs_kl_pairs:
            extra["kl_estimate"] = kto_kl_estimate(o["logps"][b:], o["ref_logps"][b:])
        if info.needs_running_mean:  # BCO: fold this batch's rewards into the running mean first (TRL's order)
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
    if spec.info.needs_running_mean:
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
