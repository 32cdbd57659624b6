"""Eager checks of host batches (outside jit): shapes, finiteness, empty completions, and the
fields a registered loss reads. The trainer runs them on the first batch; ``validate_batch``
is the entry point."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from tokax.train.losses.common import PreferenceBatch, TokenBatch, UnpairedBatch
from tokax.train.losses.registry import LOSS_INFO, get_loss
from tokax.train.losses.treg import TOKEN_FIELDS

__all__ = ["validate_batch", "validate_preference_batch", "validate_token_batch", "validate_unpaired_batch"]




def _concrete(x: Any, name: str) -> np.ndarray:
    try:
        return np.asarray(jax.device_get(x))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError) as err:
        raise TypeError(
            f"validate_*_batch reads concrete values ({name} is a tracer); call it outside jax.jit, "
            f"on the host batch, and use check_finite(loss, metrics) inside jit"
        ) from err


def _check_fields(batch: Any, seq_fields: Sequence[str], tok_fields: Sequence[str], required: Sequence[str]) -> int:
    """Shape / finiteness checks shared by the validators; returns B."""
    cls = type(batch).__name__
    for f in required:
        if getattr(batch, f) is None:
            raise ValueError(f"{cls}.{f} is None but the loss needs it")
    batch_size = None
    time_len = None
    for f in list(seq_fields) + list(tok_fields):
        v = getattr(batch, f)
        if v is None:
            continue
        a = _concrete(v, f)
        want_ndim = 1 if f in seq_fields else 2
        if a.ndim != want_ndim:
            raise ValueError(f"{cls}.{f} must be {'[B]' if want_ndim == 1 else '[B, T]'}, got shape {a.shape}")
        if batch_size is None:
            batch_size = a.shape[0]
        elif a.shape[0] != batch_size:
            raise ValueError(f"{cls}.{f} has batch size {a.shape[0]}, other fields have {batch_size}")
        if want_ndim == 2:
            if time_len is None:
                time_len = a.shape[1]
            elif a.shape[1] != time_len:
                raise ValueError(f"{cls}.{f} has length {a.shape[1]}, other [B, T] fields have {time_len}")
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            bad = np.argwhere(~np.isfinite(a))[:5].tolist()
            raise ValueError(f"{cls}.{f} has non-finite values at {bad}")
    if batch_size == 0:
        raise ValueError(f"{cls} is empty (batch size 0)")
    return int(batch_size or 0)


def _check_nonempty(batch: Any, field: str, per_row_axis: int | None) -> None:
    v = getattr(batch, field)
    if v is None:
        return
    a = _concrete(v, field).astype(np.float64)
    counts = a if per_row_axis is None else a.sum(axis=per_row_axis)
    empty = np.flatnonzero(counts <= 0)
    if empty.size:
        kind = "count" if per_row_axis is None else "mask sum"
        raise ValueError(
            f"{type(batch).__name__}.{field}: example(s) {empty[:10].tolist()} have an empty completion "
            f"({kind} 0); drop them or fix the loss mask before computing the loss"
        )


_PREF_SEQ = (
    "chosen_logps",
    "rejected_logps",
    "chosen_counts",
    "rejected_counts",
    "ref_chosen_logps",
    "ref_rejected_logps",
    "chosen_kl",
    "rejected_kl",
)
_PREF_TOK = TOKEN_FIELDS  # T-REG's per-token fields


def _required_for(loss: str | Callable | None) -> tuple[str, ...]:
    if loss is None:
        return ()
    if isinstance(loss, str):
        get_loss(loss)  # raises a clear error for unknown names
        return LOSS_INFO[loss].required
    for name, info in LOSS_INFO.items():
        if get_loss(name) is loss:
            return info.required
    return ()


def validate_preference_batch(batch: PreferenceBatch, loss: str | Callable | None = None) -> None:
    """Eagerly check a paired batch; raise ValueError naming the bad field.

    Checks: shapes ([B] / [B, T], one B and T), finite values, no empty
    completion (`chosen_counts` / `rejected_counts` > 0, and every row of
    `chosen_mask` / `rejected_mask` non-empty when given), and, if `loss` (a
    registry name or function) is given, that the fields it reads are set.
    Call it on the host batch, outside jit.
    """
    if not isinstance(batch, PreferenceBatch):
        raise TypeError(f"expected a PreferenceBatch, got {type(batch).__name__}")
    _check_fields(batch, _PREF_SEQ, _PREF_TOK, _required_for(loss))
    for f in ("chosen_counts", "rejected_counts"):
        _check_nonempty(batch, f, None)
    for f in ("chosen_mask", "rejected_mask"):
        _check_nonempty(batch, f, 1)


def validate_unpaired_batch(batch: UnpairedBatch, loss: str | Callable | None = None) -> None:
    """Eagerly check a KTO / BCO batch (shapes, finiteness, empty completions, bool labels)."""
    if not isinstance(batch, UnpairedBatch):
        raise TypeError(f"expected an UnpairedBatch, got {type(batch).__name__}")
    _check_fields(batch, ("logps", "ref_logps", "counts", "desirable"), (), _required_for(loss))
    _check_nonempty(batch, "counts", None)
    lab = _concrete(batch.desirable, "desirable")
    if lab.dtype != np.bool_ and not np.all((lab == 0) | (lab == 1)):
        raise ValueError("UnpairedBatch.desirable must be bool (or 0/1)")


def validate_token_batch(batch: TokenBatch, loss: str | Callable | None = None) -> None:
    """Eagerly check an SFT / distillation batch (shapes, finiteness, rows with an empty mask)."""
    if not isinstance(batch, TokenBatch):
        raise TypeError(f"expected a TokenBatch, got {type(batch).__name__}")
    _check_fields(batch, (), ("mask", "token_logps", "lse", "token_kl"), _required_for(loss))
    _check_nonempty(batch, "mask", 1)


def validate_batch(batch: Any, loss: str | Callable | None = None) -> None:
    """Dispatch to the validator of the batch's type."""
    if isinstance(batch, PreferenceBatch):
        validate_preference_batch(batch, loss)
    elif isinstance(batch, UnpairedBatch):
        validate_unpaired_batch(batch, loss)
    elif isinstance(batch, TokenBatch):
        validate_token_batch(batch, loss)
    else:
        raise TypeError(f"unknown batch type {type(batch).__name__}")
