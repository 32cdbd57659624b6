"""Writes tests/model/fixtures/hf_reference.npz from HF transformers (needs the
`bench` extra): prompt ids, a slice of the last-position logits (the top 64
plus 4096 fixed random vocabulary ids), the full-vocabulary max |logit| for
the relative error, the top-5, and HF's greedy 64-token continuation.

    python tests/model/make_reference_fixture.py
"""

from pathlib import Path

import numpy as np

from tests.model.hf_reference import hf_outputs

OUT = Path(__file__).parent / "fixtures" / "hf_reference.npz"


def main():
    rows = hf_outputs(64)
    rng = np.random.RandomState(0)
    arrays = {}
    for i, r in enumerate(rows):
        lg = r["logits"]
        idx = np.unique(np.concatenate([np.argsort(-lg)[:64], rng.choice(lg.size, 4096, replace=False)]))
        arrays[f"ids_{i}"] = r["ids"]
        arrays[f"logit_idx_{i}"] = idx.astype(np.int64)
        arrays[f"logit_val_{i}"] = lg[idx].astype(np.float32)
        arrays[f"absmax_{i}"] = np.float32(np.abs(lg).max())
        arrays[f"top5_{i}"] = np.argsort(-lg)[:5].astype(np.int64)
        arrays[f"greedy_{i}"] = r["greedy"].astype(np.int64)
    arrays["n"] = np.int64(len(rows))
    OUT.parent.mkdir(exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(rows)} prompts)")


if __name__ == "__main__":
    main()
