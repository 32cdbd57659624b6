"""Training metrics on disk: one JSON line per logged step, and the same scalars for TensorBoard.

``MetricsLogger(workdir)`` appends to ``workdir/metrics.jsonl`` (the record a resumed run
truncates and continues) and writes an event file under ``workdir/tb`` with tensorboardX
(one ``Event`` per logged step, its finite scalars as ``simple_value``\\ s). tensorboardX
writes from a background thread and flushes to disk about once a second; ``close()``
writes everything out. ``read_events(path)`` reads an event file back (tests, quick looks).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["MetricsLogger", "read_events"]

_WRITERS = itertools.count()  # numbers this process's event files, so two never share a name


class MetricsLogger:
    """Appends one JSON object per logged step to ``workdir/metrics.jsonl`` and
    the same scalars to a TensorBoard event file under ``workdir/tb``."""

    def __init__(self, workdir: str, tensorboard: bool = True) -> None:
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if tensorboard:
            # Imported here: tensorboardX imports torch when it is installed (seconds), and
            # runs with tensorboard=False should not pay for that.
            from tensorboardX import FileWriter
            from tensorboardX.proto.summary_pb2 import Summary

            self._summary = Summary
            # events.out.tfevents.<time>.<host>.<pid>.<n>; flushed from tensorboardX's thread.
            self.tb = FileWriter(os.path.join(workdir, "tb"), flush_secs=1,
                                 filename_suffix=f".{os.getpid()}.{next(_WRITERS)}")

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
            Summary = self._summary
            values = [Summary.Value(tag=k, simple_value=v) for k, v in row.items()
                      if k != "step" and v is not None and math.isfinite(v)]
            self.tb.add_summary(Summary(value=values), global_step=int(step))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _num(v: Any) -> float | None:
    x = float(np.asarray(v))
    return x if math.isfinite(x) else None  # JSON has no NaN / inf


def read_events(path: str) -> list[tuple[int, dict[str, float]]]:
    """``(step, {tag: value})`` for each event of a TensorBoard event file that holds scalars,
    in file order. Checks both checksums of each record (TFRecord framing: length u64,
    masked CRC-32C of the length, the ``Event`` proto, masked CRC-32C of the proto)."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    with open(path, "rb") as f:
        buf = f.read()
    out, i = [], 0
    while i < len(buf):
        head = buf[i : i + 8]
        (n,) = struct.unpack("<Q", head)
        if struct.unpack("<I", buf[i + 8 : i + 12])[0] != masked_crc32c(head):
            raise ValueError(f"{path}: bad length checksum at byte {i}")
        data = buf[i + 12 : i + 12 + n]
        if struct.unpack("<I", buf[i + 12 + n : i + 16 + n])[0] != masked_crc32c(data):
            raise ValueError(f"{path}: bad record checksum at byte {i}")
        i += 16 + n
        ev = Event.FromString(data)
        vals = {v.tag: v.simple_value for v in ev.summary.value}
        if vals:
            out.append((int(ev.step), vals))
    return out
