"""The optimizer and its learning-rate schedule, from the config's ``optimizer`` block."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

__all__ = ["build_schedule", "build_optimizer"]


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
