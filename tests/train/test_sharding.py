"""Sharding: logical axes, rule resolution, and the train step on 8 simulated CPU devices.

The multi-device checks run `mesh_worker.py` in a subprocess (XLA_FLAGS must be
set before jax is imported, and the rest of the pytest process keeps 1 device).
The reference is the same jitted step on a one-device mesh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tokax.model import lora as lora_lib
from tokax.model.config import tiny
from tokax.model.decoder import init_params
from tokax.train import sharding as shd

HERE = os.path.dirname(os.path.abspath(__file__))


class FakeMesh:
    """Enough of a Mesh for `logical_to_spec` (it reads only `.shape`)."""

    def __init__(self, **sizes):
        self.shape = {a: sizes.get(a, 1) for a in shd.MESH_AXES}


def test_logical_axes_cover_every_param_with_matching_rank():
    cfg = tiny()
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))  # shapes suffice
    axes = shd.param_logical_axes(params)
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(jax.tree.map(lambda _: (), params), is_leaf=is_axes)
    flat_a = jax.tree.leaves(axes, is_leaf=is_axes)
    flat_p = jax.tree.leaves(params)
    for a, p in zip(flat_a, flat_p):
        assert len(a) == len(p.shape)
    assert axes["embed"] == ("vocab", "embed")
    assert axes["layer_0"]["q"] == ("embed", "heads", "head_dim")
    assert axes["layer_0"]["o"] == ("heads", "head_dim", "embed")
    assert axes["layer_1"]["down"] == ("mlp", "embed")
    lora = lora_lib.lora_init(params, ("q", "o"), 2, 4.0, jax.random.PRNGKey(1))
    la = shd.param_logical_axes(lora)
    assert la["layer_0"]["q"] == {"a": ("embed", "lora_rank"), "b": ("lora_rank", "heads", "head_dim")}
    assert la["layer_0"]["o"]["a"] == ("heads", "head_dim", "lora_rank")
    with pytest.raises(ValueError, match="no logical axes"):
        shd.param_logical_axes({"mystery": np.zeros(3)})


def test_rule_resolution():
    rules = shd.DEFAULT_RULES
    m = FakeMesh(data=2, fsdp=2, tensor=2)
    assert shd.logical_to_spec(("vocab", "embed"), (64, 32), m, rules) == P("tensor", "fsdp")
    assert shd.logical_to_spec(("batch", "length"), (8, 16), m, rules) == P(("data", "fsdp"))
    # a KV-head count the tensor axis does not divide stays replicated (Gemma 3 270M has 1 KV head)
    assert shd.logical_to_spec(("embed", "kv_heads", "head_dim"), (32, 1, 8), m, rules) == P("fsdp")
    # a mesh axis splits one dimension only
    assert shd.logical_to_spec(("heads", "mlp"), (4, 8), m, rules) == P("tensor")
    # size-1 mesh axes never appear
    assert shd.logical_to_spec(("vocab", "embed"), (64, 32), FakeMesh(data=8), rules) == P()
    custom = (("embed", ("fsdp", "tensor")),)
    assert shd.logical_to_spec(("embed",), (32,), m, custom) == P(("fsdp", "tensor"))
    with pytest.raises(ValueError, match="unknown mesh axes"):
        shd.logical_to_spec(("embed",), (32,), m, (("embed", "model"),))


def test_make_mesh_sizes_and_errors():
    mesh = shd.make_mesh({"data": -1})
    assert mesh.axis_names == shd.MESH_AXES and mesh.devices.size == len(jax.devices())
    with pytest.raises(ValueError, match="needs 16 devices"):
        shd.make_mesh({"data": 16})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        shd.make_mesh({"model": 1})


def _run_worker(tmp_path, *plan):
    out = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "mesh_worker.py"), "step", str(out), *plan],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _check_equal_to_single(res):
    ref = res["single"]
    assert ref["n_devices"] == 1 and ref["param_moved"] > 1e-3  # the step really updates params
    for name, r in res.items():
        assert r["n_devices"] == (1 if name == "single" else 8)
        np.testing.assert_allclose(r["losses"], ref["losses"], rtol=2e-6, atol=2e-6, err_msg=name)
        assert r["param_max_diff"] < 1e-5, (name, r["param_max_diff"])  # updates are ~2e-2
        for k in ("grad_norm", "lr"):
            np.testing.assert_allclose(r["metrics"][k], ref["metrics"][k], rtol=1e-5, err_msg=f"{name} {k}")


def test_train_step_layouts_match_single_device(tmp_path):
    res = _run_worker(tmp_path, "sft_full_accum2=data8,fsdp8,data4_tensor2", "dpo_lora=data2_fsdp2_tensor2")
    _check_equal_to_single(res["sft_full_accum2"])
    _check_equal_to_single(res["dpo_lora"])
    sft = res["sft_full_accum2"]
    # the layouts really shard: per-device shards of the embedding [128, 32] and q [32, 4, 8]
    assert sft["fsdp8"]["specs"]["['embed']"] == str(P(None, "fsdp"))
    assert sft["fsdp8"]["shard_shapes"]["['embed']"] == [128, 4]
    assert sft["data4_tensor2"]["specs"]["['layer_0']['q']"] == str(P(None, "tensor"))
    assert sft["data4_tensor2"]["shard_shapes"]["['layer_0']['q']"] == [32, 2, 8]
    assert sft["data8"]["shard_shapes"]["['embed']"] == [128, 32]  # pure data parallel: replicated
    assert res["dpo_lora"]["data2_fsdp2_tensor2"]["shard_shapes"]["['layer_0']['q']['b']"] == [4, 2, 8]


@pytest.mark.slow
def test_train_step_more_layouts_match_single_device(tmp_path):
    res = _run_worker(tmp_path, "sft_full_accum2=data2_fsdp2_tensor2,data4_sequence2", "dpo_lora=data8,fsdp8,data4_sequence2")
    _check_equal_to_single(res["sft_full_accum2"])
    _check_equal_to_single(res["dpo_lora"])
