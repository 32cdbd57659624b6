"""Runs in a subprocess with 8 simulated CPU devices (tests/train/test_sharding.py, test_checkpoint.py).

    python tests/train/mesh_worker.py step OUT.json CASE=LAYOUT,LAYOUT ...   # train step vs one device
    python tests/train/mesh_worker.py checkpoint DIR OUT.json   # save on one mesh, restore on others

Writes raw numbers as JSON; the tests hold the assertions.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tokax.model import lora as lora_lib  # noqa: E402
from tokax.model.config import tiny  # noqa: E402
from tokax.model.decoder import init_params  # noqa: E402
from tokax.train import sharding as shd  # noqa: E402
from tokax.train.checkpoint import Checkpointer, abstract_state  # noqa: E402
from tokax.train.optim import build_optimizer  # noqa: E402
from tokax.train.step import StepSpec, init_train_state, make_train_step  # noqa: E402

LAYOUTS = {
    "single": None,
    "data8": {"data": 8},
    "fsdp8": {"fsdp": 8},
    "data4_tensor2": {"data": 4, "tensor": 2},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
    "data4_sequence2": {"data": 4, "sequence": 2},
}
RULES = shd.DEFAULT_RULES
CFG = tiny(vocab_size=128, n_layers=1)  # 4 heads on 2 KV heads: tensor=2 splits both; 1 layer keeps compiles short
T = 16


def sft_batch(rng: np.random.Generator, A: int, b: int) -> dict[str, np.ndarray]:
    toks = rng.integers(0, CFG.vocab_size, (A, b, T)).astype(np.int32)
    # two packed documents per row: positions restart, segment ids 1 / 2, last row half padding
    pos = np.concatenate([np.arange(10), np.arange(T - 10)])[None, None].repeat(A, 0).repeat(b, 1).astype(np.int32)
    seg = np.concatenate([np.ones(10), 2 * np.ones(T - 10)])[None, None].repeat(A, 0).repeat(b, 1).astype(np.int32)
    pos[:, -1, 8:] = -1
    seg[:, -1, 8:] = 0
    tgt = rng.integers(0, CFG.vocab_size, (A, b, T)).astype(np.int32)
    mask = (pos >= 0).astype(np.float32)
    mask[:, :, 9] = 0.0
    return {"tokens": toks, "targets": tgt, "positions": pos, "segment_ids": seg, "mask": mask}


def pref_batch(rng: np.random.Generator, A: int, b: int) -> dict[str, np.ndarray]:
    out = {}
    for side in ("chosen", "rejected"):
        n = rng.integers(8, T, (A, b))
        pos = np.where(np.arange(T)[None, None] < n[..., None], np.arange(T)[None, None], -1).astype(np.int32)
        mask = ((np.arange(T)[None, None] >= 5) & (pos >= 0)).astype(np.float32)
        out[f"{side}_tokens"] = rng.integers(0, CFG.vocab_size, (A, b, T)).astype(np.int32)
        out[f"{side}_targets"] = rng.integers(0, CFG.vocab_size, (A, b, T)).astype(np.int32)
        out[f"{side}_positions"] = pos
        out[f"{side}_mask"] = mask
    return out


def mesh_for(name: str):
    lay = LAYOUTS[name]
    return shd.make_mesh({}, devices=jax.devices()[:1]) if lay is None else shd.make_mesh(lay)


def one_step(spec, trainable, frozen, batch, mesh, opt, steps=2):
    tx, sched = build_optimizer(opt, total_steps=10)
    p_sh = shd.param_shardings(trainable, mesh, RULES)
    shapes = jax.eval_shape(lambda p: init_train_state(spec, p, tx), trainable)
    rep = shd.replicated(mesh)
    state_sh = {"step": rep, "params": p_sh,
                "opt_state": shd.opt_state_shardings(shapes["opt_state"], trainable, p_sh, mesh),
                "loss_state": jax.tree.map(lambda _: rep, shapes["loss_state"]), "nonfinite": rep}
    frozen_sh = {k: shd.param_shardings(v, mesh, RULES) for k, v in frozen.items()}
    batch_sh = shd.batch_shardings(batch, mesh, RULES)
    step = make_train_step(spec, tx, sched, mesh, RULES, state_sh, frozen_sh, batch_sh)
    state = jax.jit(lambda p: init_train_state(spec, p, tx), out_shardings=state_sh)(jax.device_put(trainable, p_sh))
    frozen_d = jax.device_put(frozen, frozen_sh)
    losses = []
    for _ in range(steps):
        state, m = step(state, frozen_d, batch)
        losses.append(float(m["loss"]))
    leaves = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    specs = {jax.tree_util.keystr(p): str(x.sharding.spec) for p, x in leaves}
    shard_shapes = {jax.tree_util.keystr(p): list(x.addressable_shards[0].data.shape) for p, x in leaves}
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state["params"])
    return losses, params, m, specs, shard_shapes


def run_step(out_path: str, plan: dict[str, list[str]]) -> None:
    """``plan``: case name -> layouts to run ('single' is always run first, as the reference)."""
    rng = np.random.default_rng(0)
    base = jax.device_get(init_params(CFG, jax.random.PRNGKey(0)))
    base = jax.tree.map(lambda x: np.asarray(x) * 1.0, base)
    base["embed"] = base["embed"] * 0.2
    opt = {"name": "adamw", "lr": 1e-2, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.01, "grad_clip": 1.0,
           "eps": 1e-4}  # eps >> float32 noise of near-zero gradients, whose Adam step would be +-lr
    sft = sft_batch(rng, A=2, b=8)
    pref = pref_batch(rng, A=1, b=8)
    lora = jax.tree.map(np.asarray, lora_lib.lora_init(base, ("q", "v", "gate", "down"), 4, 8.0, jax.random.PRNGKey(1)))
    # non-zero B so the adapters matter from the first step
    for layer in lora.values():
        for ab in layer.values():
            ab["b"] = rng.normal(size=ab["b"].shape).astype(np.float32) * 0.05
    cases = {
        "sft_full_accum2": (StepSpec(model=CFG, loss="sft", loss_kwargs=(("z_loss", 1e-3),)), base, {}, sft),
        "dpo_lora": (StepSpec(model=CFG, loss="dpo", loss_kwargs=(("beta", 0.5),), lora_alpha=8.0), lora,
                     {"base": base}, pref),
    }
    result = {}
    for cname, layouts in plan.items():
        spec, trainable, frozen, batch = cases[cname]
        layouts = ["single"] + [lay for lay in layouts if lay != "single"]
        res = {}
        ref = None
        for lname in layouts:
            mesh = mesh_for(lname)
            t0 = time.time()
            losses, params, m, specs, shard_shapes = one_step(spec, trainable, frozen, batch, mesh, opt)
            print(f"{cname} {lname}: {time.time() - t0:.1f}s", flush=True)
            if ref is None:
                ref = params
            diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)))
            moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(trainable)))
            res[lname] = {"losses": losses, "param_max_diff": diff, "param_moved": moved, "specs": specs,
                          "shard_shapes": shard_shapes, "n_devices": int(mesh.devices.size),
                          "metrics": {k: float(v) for k, v in m.items()}}
        result[cname] = res
    with open(out_path, "w") as f:
        json.dump(result, f)


def run_checkpoint(ckpt_dir: str, out_path: str) -> None:
    spec = StepSpec(model=CFG, loss="sft")
    base = init_params(CFG, jax.random.PRNGKey(3))
    tx, _ = build_optimizer({"name": "adamw", "lr": 1e-3, "schedule": "constant"}, 10)

    def sharded_state(mesh):
        p_sh = shd.param_shardings(base, mesh, RULES)
        shapes = jax.eval_shape(lambda p: init_train_state(spec, p, tx), base)
        rep = shd.replicated(mesh)
        sh = {"step": rep, "params": p_sh, "opt_state": shd.opt_state_shardings(shapes["opt_state"], base, p_sh, mesh),
              "loss_state": {}, "nonfinite": rep}
        return shapes, sh

    save_mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    shapes, sh = sharded_state(save_mesh)
    state = jax.jit(lambda p: init_train_state(spec, p, tx), out_shardings=sh)(base)
    # make the optimizer state non-trivial and the step non-zero
    state["opt_state"] = jax.tree.map(lambda x: x + 0.5 if x.dtype == jnp.float32 else x, state["opt_state"])
    state["step"] = state["step"] + 7
    ck = Checkpointer(ckpt_dir, max_to_keep=2)
    ck.save(7, state, {"step": 7, "data": {"epoch": 1, "index": 5, "offset": 9}})
    ck.wait()
    saved = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state)
    out = {"saved_embed_spec": str(state["params"]["embed"].sharding.spec), "restores": {}}
    for name, axes in {"tensor2_data4": {"tensor": 2, "data": 4}, "fsdp8": {"fsdp": 8},
                       "single": None}.items():
        mesh = shd.make_mesh({}, devices=jax.devices()[:1]) if axes is None else shd.make_mesh(axes)
        shapes, sh = sharded_state(mesh)
        restored, meta = Checkpointer(ckpt_dir).restore(abstract_state(shapes, sh))
        got = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), restored)
        diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                   for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(saved)))
        same_tree = jax.tree.structure(got) == jax.tree.structure(saved)
        out["restores"][name] = {
            "max_diff": diff, "same_tree": same_tree, "meta": meta,
            "embed_spec": str(restored["params"]["embed"].sharding.spec),
            "embed_mesh": dict(restored["params"]["embed"].sharding.mesh.shape),
            "mu_q_spec": str(restored["opt_state"][0].mu["layer_0"]["q"].sharding.spec),
        }
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    assert len(jax.devices()) == 8, jax.devices()
    if sys.argv[1] == "step":
        run_step(sys.argv[2], {a.split("=")[0]: a.split("=")[1].split(",") for a in sys.argv[3:]})
    elif sys.argv[1] == "checkpoint":
        run_checkpoint(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]}")
