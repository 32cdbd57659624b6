"""`trainer.run` in a subprocess, for the kill-and-resume test (tests/train/test_trainer.py).

    python tests/train/run_worker.py CONFIG_FILE OVERRIDES_JSON [SLEEP_PER_STEP]

OVERRIDES_JSON maps dotted config keys to values. SLEEP_PER_STEP (seconds)
slows each step down so that the parent can kill the run mid-way.
"""

from __future__ import annotations

import json
import sys
import time

from tokax.testing import load_config


if __name__ == "__main__":
    cfg = load_config(sys.argv[1], json.loads(sys.argv[2]))
    pause = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    from tokax.train.trainer import run

    out = run(cfg, on_step=(lambda step, m: time.sleep(pause)) if pause else None)
    print("FINAL " + json.dumps(out), flush=True)
