"""A training workdir that is safe to rerun into: one run at a time, the same config, no silent resume.

``run(config)`` resumes from ``workdir/checkpoints`` when it holds one. That is
only right when the rerun is the same experiment, so the trainer

* takes an exclusive lock on ``workdir/.lock`` for the whole run (``WorkdirLock``):
  a second run into the same workdir stops at once, naming the first one's pid;
* writes the resolved config to ``workdir/config.json`` and, on a rerun, compares
  it (``check_config``): a difference in anything that changes the training
  trajectory (loss, model, data, optimizer, seed, steps...) is refused with the
  keys named, unless ``allow_config_change=True``, which logs the differences
  and keeps the old file as ``config.<time>.json`` once the run has its state
  (``save_config``). Keys that only change
  what is logged or how (``PRESENTATION_KEYS``, and the mesh: a checkpoint
  restores onto any mesh) may change freely.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from tokax.errors import InputError

__all__ = ["WorkdirError", "WorkdirLock", "config_as_dict", "check_config", "save_config", "PRESENTATION_KEYS"]

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"

# Keys whose change leaves the training trajectory as it was (what is logged, how often, where).
PRESENTATION_KEYS = frozenset({
    "workdir", "progress", "log_every", "eval_every", "eval_batches", "eval_at_start", "checkpoint_every",
    "keep_checkpoints", "async_checkpoint", "tensorboard", "nonfinite", "max_consecutive_nonfinite",
    "allow_config_change", "data.tokenizer_dir",
})
PRESENTATION_PREFIXES = ("mesh.",)  # a checkpoint restores onto any mesh


class WorkdirError(InputError):
    """The workdir cannot be used for this run (in use, or holding another experiment)."""


class WorkdirLock:
    """An exclusive ``flock`` on ``workdir/.lock`` (released on ``release()`` or process exit)."""

    def __init__(self, workdir: str) -> None:
        import fcntl

        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                owner = os.pread(self._fd, 200, 0).decode(errors="replace").strip() or "another process"
            finally:
                os.close(self._fd)
            raise WorkdirError(f"workdir {workdir} is in use by another training run ({owner}); wait for it to "
                               "finish or pass another --config.workdir") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def config_as_dict(config: Any) -> dict[str, Any]:
    """The config as plain JSON values (tuples become lists), keys sorted."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return json.loads(json.dumps(config, sort_keys=True, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _presentation(key: str) -> bool:
    return key in PRESENTATION_KEYS or key.startswith(PRESENTATION_PREFIXES)


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every trajectory key that differs (added or removed keys too)."""
    a, b = _flatten(old), _flatten(new)
    out = []
    for k in sorted(set(a) | set(b)):
        if _presentation(k):
            continue
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if va != vb:
            out.append(f"{k}: {va!r} -> {vb!r}")
    return out


def check_config(workdir: str, config: Any, allow_change: bool, log=None) -> None:
    """Refuse ``config`` when the workdir's saved config differs in a trajectory key (unless
    ``allow_change``, which logs the differences). Writes nothing: ``save_config`` does, once the
    run has restored or initialised its state, so that a run that fails before that leaves the
    workdir's record as it was."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise WorkdirError(f"{path} is unreadable ({e}); it records the config this workdir was trained "
                           "with: restore it, or pass another --config.workdir") from e
    diffs = config_differences(old, config_as_dict(config))
    if not diffs:
        return
    shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
    if not allow_change:
        raise WorkdirError(
            f"workdir {workdir} holds a run with another config ({shown}); pass another --config.workdir "
            "for a new experiment, or --config.allow_config_change=True to continue this one anyway")
    if log is not None:
        log(f"config changed ({shown}); continuing, as allow_config_change=True asks")


def save_config(workdir: str, config: Any, log=None) -> None:
    """Write ``workdir/config.json``; a different earlier one is kept as ``config.<time>.json``."""
    path = os.path.join(workdir, CONFIG_FILE)
    new = config_as_dict(config)
    if os.path.exists(path):
        try:
            with open(path) as f:
                same = json.load(f) == new
        except (OSError, json.JSONDecodeError):
            same = False
        if same:
            return
        kept = os.path.join(workdir, f"config.{time.strftime('%Y%m%d-%H%M%S')}.json")
        os.replace(path, kept)
        if log is not None:
            log(f"the workdir's earlier config is kept as {kept}")
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(new, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def check_checkpoint_meta(meta: Mapping[str, Any], loss: str, model: Mapping[str, Any], lora_alpha, directory: str,
                          allow_change: bool) -> None:
    """A workdir from before ``config.json``: its checkpoint's own record of loss, model and LoRA."""
    diffs = []
    if meta.get("loss") not in (None, loss):
        diffs.append(f"loss: {meta.get('loss')!r} -> {loss!r}")
    if meta.get("model") is not None and config_as_dict(meta["model"]) != config_as_dict(model):
        old, new = _flatten(config_as_dict(meta["model"])), _flatten(config_as_dict(model))
        diffs += [f"model.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                  if old.get(k) != new.get(k)]
    if "lora_alpha" in meta and meta["lora_alpha"] != lora_alpha:
        diffs.append(f"lora_alpha: {meta['lora_alpha']!r} -> {lora_alpha!r}")
    if diffs and not allow_change:
        raise WorkdirError(f"the checkpoints in {directory} were trained with another config ({'; '.join(diffs)}); "
                           "pass another --config.workdir, or --config.allow_config_change=True")
