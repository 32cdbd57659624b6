"""Checkpoints: round trip on one device, and restore onto a different mesh (8 simulated devices)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from tokax.model.config import tiny
from tokax.model.decoder import init_params
from tokax.train.checkpoint import Checkpointer, restore_params
from tokax.train.optim import build_optimizer
from tokax.train.step import StepSpec, init_train_state

HERE = os.path.dirname(os.path.abspath(__file__))


def _state():
    cfg = tiny()
    spec = StepSpec(model=cfg, loss="bco")  # has a loss state (running mean) too
    tx, _ = build_optimizer({"name": "adamw", "lr": 1e-3, "schedule": "constant"}, 10)
    st = init_train_state(spec, init_params(cfg, jax.random.PRNGKey(0)), tx)
    st["opt_state"] = jax.tree.map(lambda x: x + 0.25 if x.dtype == jnp.float32 else x, st["opt_state"])
    st["loss_state"] = {"bco_mean": jnp.float32(0.3), "bco_count": jnp.float32(12.0)}
    st["step"] = jnp.int32(5)
    return st


def test_roundtrip_latest_and_meta(tmp_path):
    st = _state()
    ck = Checkpointer(tmp_path / "ck", max_to_keep=2)
    assert ck.latest_step() is None
    ck.save(5, st, {"step": 5, "data": {"epoch": 0, "index": 3, "offset": 17}})
    st2 = jax.tree.map(lambda x: x + 1, st)
    ck.save(9, st2, {"step": 9, "data": {"epoch": 1, "index": 0, "offset": 0}})
    ck.wait()
    assert ck.latest_step() == 9 and ck.all_steps() == [5, 9]
    got, meta = Checkpointer(tmp_path / "ck").restore(st)
    assert meta == {"step": 9, "data": {"epoch": 1, "index": 0, "offset": 0}}
    assert jax.tree.structure(got) == jax.tree.structure(st)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(st2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    old, meta5 = Checkpointer(tmp_path / "ck").restore(st, step=5)
    assert meta5["data"]["offset"] == 17
    np.testing.assert_array_equal(old["params"]["embed"], st["params"]["embed"])
    # params alone (e.g. a teacher or an SFT init for another run)
    params, _ = restore_params(tmp_path / "ck", st["params"])
    np.testing.assert_array_equal(params["layer_1"]["down"], st2["params"]["layer_1"]["down"])
    ck.close()


def test_max_to_keep(tmp_path):
    st = _state()
    ck = Checkpointer(tmp_path / "ck", max_to_keep=2)
    for s in (1, 2, 3):
        ck.save(s, st, {"step": s, "data": {}})
    ck.wait()
    assert ck.all_steps() == [2, 3]
    ck.close()


def test_restore_onto_other_meshes(tmp_path):
    out = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "mesh_worker.py"), "checkpoint", str(tmp_path / "ck"), str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["saved_embed_spec"] == str(P(None, "fsdp"))  # saved sharded over fsdp=4
    for name, r in res["restores"].items():
        assert r["same_tree"], name
        assert r["max_diff"] == 0.0, (name, r["max_diff"])
        assert r["meta"]["data"] == {"epoch": 1, "index": 5, "offset": 9}
    assert res["restores"]["tensor2_data4"]["embed_spec"] == str(P("tensor"))
    assert res["restores"]["tensor2_data4"]["mu_q_spec"] == str(P(None, "tensor"))  # Adam mu like q
    assert res["restores"]["fsdp8"]["embed_spec"] == str(P(None, "fsdp"))
    assert res["restores"]["fsdp8"]["embed_mesh"]["fsdp"] == 8
    assert res["restores"]["single"]["embed_mesh"] == {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1}
