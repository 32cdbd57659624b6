"""Orbax checkpoints of the train state, restorable onto any mesh.

A checkpoint at step s holds two items:

* ``state``: the train-state pytree (step, trainable params, optimizer
  state, loss state such as BCO's running mean), saved with
  ``StandardSave``: every array is written as a tensorstore array with its
  global shape, independent of how it was sharded;
* ``meta``: JSON with the data iterator's position (so a resumed run reads
  the next batch an uninterrupted run would have read), the step, and
  whatever else the trainer records (model config, loss name).

Restoring takes an *abstract* state (``jax.ShapeDtypeStruct`` leaves that
carry the target ``NamedSharding``); orbax reads each shard of the new
layout directly, so a checkpoint written on a (data=2, fsdp=4) mesh restores
onto (tensor=2, data=4) or a single device unchanged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from tokax.errors import InputError

__all__ = ["Checkpointer", "CheckpointError", "abstract_state", "restore_params"]

log = logging.getLogger(__name__)


class CheckpointError(InputError):
    """No checkpoint of a workdir can be restored onto the run's state."""


def abstract_state(state_shapes: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` tree (shape, dtype from ``state_shapes``) carrying ``shardings``."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_shapes, shardings)


class Checkpointer:
    """A ``CheckpointManager`` over ``directory`` keeping the ``max_to_keep`` newest steps.

    ``save`` is asynchronous by default (training goes on while arrays are
    written); orbax commits a step atomically (written to a temporary
    directory, then renamed), so a run killed mid-save leaves the previous
    checkpoint as the latest one. ``wait()`` blocks until pending saves are
    committed.
    """

    def __init__(self, directory: str | os.PathLike[str], max_to_keep: int | None = 2, async_save: bool = True) -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._mgr = ocp.CheckpointManager(self.directory, options=opts, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def save(self, step: int, state: Any, meta: Mapping[str, Any], force: bool = True) -> bool:
        """Save ``state`` and JSON ``meta`` as step ``step`` (returns whether a save started)."""
        return self._mgr.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))),
            force=force,
        )

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore (state, meta) at ``step`` (default: latest) onto ``target``'s shardings.

        ``target``: an abstract state (``abstract_state``) or a concrete one
        whose arrays' shardings are used.
        """
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        target = jax.tree.map(_as_abstract, target)
        out = self._mgr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        )
        return out.state, dict(out.meta)

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON ``meta`` at ``step``; by default the newest step whose meta is readable."""
        if step is None:
            for s in sorted(self.all_steps(), reverse=True):
                try:
                    return self.restore_meta(s)
                except Exception:  # noqa: BLE001 - an unreadable step: try the one before
                    continue
            raise FileNotFoundError(f"no readable checkpoint in {self.directory}")
        out = self._mgr.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out.meta)

    def restore_intact(self, target: Any) -> tuple[Any, dict[str, Any], list[tuple[int, str]]]:
        """``restore`` of the newest step that restores, newest first: ``(state, meta, bad)``
        with ``bad`` the newer steps that failed and why. When no step restores, the error names
        each step's failure (a config whose state no longer fits the checkpoints fails them all;
        nothing is moved then)."""
        bad: list[tuple[int, str]] = []
        _drop_failed_read_noise()
        for s in sorted(self.all_steps(), reverse=True):
            try:
                state, meta = self.restore(target, s)
            except Exception as e:  # noqa: BLE001 - corrupted files raise many kinds of errors
                bad.append((s, f"{type(e).__name__}: {_first_sentence(str(e))}"))
                continue
            return state, meta, bad
        why = "; ".join(f"step {s}: {w}" for s, w in bad)
        raise CheckpointError(f"no checkpoint in {self.directory} restores onto this run's state ({why}); "
                              "if the model or optimizer changed, pass another --config.workdir")

    def set_aside(self, steps: list[int], dest: str) -> list[str]:
        """Move the directories of ``steps`` out of the manager's directory into ``dest`` (kept for
        inspection, never deleted) and re-read the remaining steps; returns the new paths."""
        import shutil
        import time

        self._mgr.wait_until_finished()
        os.makedirs(dest, exist_ok=True)
        moved = []
        for s in steps:
            src = os.path.join(self.directory, str(s))
            to = os.path.join(dest, f"{s}.{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(src, to)
            moved.append(to)
        self._mgr.reload()
        return moved

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()


def _first_sentence(msg: str, limit: int = 240) -> str:
    line = msg.splitlines()[0] if msg else ""
    cut = line.find(". ")
    line = line[: cut + 1] if cut > 0 else line
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _drop_failed_read_noise() -> None:
    """When a restore fails, tensorstore's pending reads keep calling back into orbax's closed
    asyncio loop, and orbax's read coroutines are dropped unfinished: Python prints each as an
    "unraisable" exception, dozens of tracebacks that bury the one real error. Drop exactly
    those (``RuntimeError('Event loop is closed')``, and exceptions of orbax's own coroutines);
    every other unraisable exception still reaches the previous hook."""
    import sys

    old = sys.unraisablehook
    if getattr(old, "_tokax_read_noise_filter", False):
        return

    def hook(arg):
        if isinstance(arg.exc_value, RuntimeError) and str(arg.exc_value) == "Event loop is closed":
            return
        code = getattr(arg.object, "cr_code", None)
        if code is not None and "orbax" in code.co_filename:
            return
        old(arg)

    hook._tokax_read_noise_filter = True
    sys.unraisablehook = hook


def _as_abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def restore_params(directory: str | os.PathLike[str], abstract_params: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Only the ``params`` subtree of a checkpoint's state (e.g. a teacher or an SFT init),
    onto the shardings of ``abstract_params``; returns (params, meta)."""
    ck = Checkpointer(directory, max_to_keep=None, async_save=False)
    try:
        step = ck.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {ck.directory}")
        item = {"params": jax.tree.map(_as_abstract, abstract_params)}
        restore_args = jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype, global_shape=x.shape), item["params"]
        )
        out = ck._mgr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=item, restore_args={"params": restore_args}, partial_restore=True),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out.state["params"], dict(out.meta)
    finally:
        ck.close()
