"""`trainer.run` in a subprocess, for the kill-and-resume test (tests/train/test_trainer.py).

    python tests/train/run_worker.py CONFIG_FILE OVERRIDES_JSON [SLEEP_PER_STEP]

OVERRIDES_JSON maps dotted config keys to values. SLEEP_PER_STEP (seconds)
slows each step down so that the parent can kill the run mid-way.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time


def load_config(path: str, overrides: dict):
    spec = importlib.util.spec_from_file_location("_cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    for key, val in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = tuple(val) if isinstance(val, list) else val
    return c


if __name__ == "__main__":
    cfg = load_config(sys.argv[1], json.loads(sys.argv[2]))
    pause = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    from tokax.train.trainer import run

    out = run(cfg, on_step=(lambda step, m: time.sleep(pause)) if pause else None)
    print("FINAL " + json.dumps(out), flush=True)
