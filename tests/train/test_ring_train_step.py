"""A full train step with attention_impl='ring' over a `sequence` mesh axis of
8 simulated CPU devices equals the single-device reference step.

The 8-device part runs this file as a script in a subprocess (XLA_FLAGS must
be set before jax is imported; the pytest process keeps one device):

    python tests/train/test_ring_train_step.py OUT.json

It writes raw numbers as JSON; the tests below hold the assertions. The
batch is a packed SFT batch (three documents per row, restarting positions,
segment ids, a padded tail) on the tiny config, whose layer 0 is a local
layer with an 8-token window and layer 1 a global one. The reference is
the same public step (`make_loss_fn`, `make_train_step`) with
attention_impl='reference' on a one-device mesh and the tokens in natural
order. The ring runs put every per-token array (tokens, targets, loss mask,
positions, segment ids) into the plain, zigzag or striped layout with
`to_layout`; the loss is a token mean, so it is invariant to the order.

How the mesh reaches the model (trainer.py is unchanged): `make_train_step`
is traced under `jax.set_mesh(mesh)`, and the gradients come from
`make_loss_fn` with the model call wrapped in `sharding.mesh_context(mesh)`
inside `jit` (the form of the trainer patch in docs/ring_attention.md).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # the 8-device worker: set the flags before jax is imported
    # Compiling dominates these tiny programs: skip XLA's slow CPU backend passes.
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (
        " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
        " --xla_llvm_disable_expensive_passes=true")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tokax.kernels.ring_attention import to_layout  # noqa: E402
from tokax.model.config import tiny  # noqa: E402
from tokax.model.decoder import init_params  # noqa: E402
from tokax.train import sharding as shd  # noqa: E402
from tokax.train.optim import build_optimizer  # noqa: E402
from tokax.train.step import StepSpec, init_train_state, make_loss_fn, make_train_step  # noqa: E402

HERE = os.path.abspath(__file__)
RULES = shd.DEFAULT_RULES
CFG = tiny(vocab_size=128)  # layer 0: local, window 8; layer 1: global; 4 query heads on 2 KV heads
T = 32  # 8 devices: 4 tokens each; zigzag chunks of 2
OPT = {"name": "adamw", "lr": 1e-2, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.01,
       "grad_clip": 1.0, "eps": 1e-4}  # eps >> float32 noise of near-zero gradients
# (case name, mesh axes, layout); the first is the reference
CASES = (
    ("single_reference", None, "plain"),
    ("sequence8_plain", {"sequence": 8}, "plain"),
    ("sequence8_zigzag", {"sequence": 8}, "zigzag"),
    ("sequence8_striped", {"sequence": 8}, "striped"),
    ("data2_tensor2_sequence2_zigzag", {"data": 2, "tensor": 2, "sequence": 2}, "zigzag"),
)


def sft_batch(rng: np.random.Generator, A: int = 1, b: int = 2) -> dict[str, np.ndarray]:
    """``[A, b, T]`` packed rows: documents of 13, 11, 8 tokens, and 19, 7 + 6 padding."""
    docs = [(13, 11, 8), (19, 7)]
    pos = np.full((A, b, T), -1, np.int32)
    seg = np.zeros((A, b, T), np.int32)
    mask = np.zeros((A, b, T), np.float32)
    for r in range(b):
        start = 0
        for s, n in enumerate(docs[r % len(docs)]):
            pos[:, r, start:start + n] = np.arange(n)
            seg[:, r, start:start + n] = s + 1
            mask[:, r, start:start + n - 1] = 1.0  # a document's last token predicts nothing
            start += n
    return {"tokens": rng.integers(0, CFG.vocab_size, (A, b, T)).astype(np.int32),
            "targets": rng.integers(0, CFG.vocab_size, (A, b, T)).astype(np.int32),
            "positions": pos, "segment_ids": seg, "mask": mask}


def _tree_np(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def no_window_loss(params, batch, mesh) -> float:
    """The reference micro-batch loss with every layer global (no window)."""
    loss_fn = make_loss_fn(StepSpec(model=CFG.replace(sliding_window=None), loss="sft"), mesh, RULES)
    return float(jax.jit(lambda p, mb: loss_fn(p, {}, mb, {})[0])(params, {k: v[0] for k, v in batch.items()}))


def run_case(cfg, params, batch, mesh) -> dict:
    spec = StepSpec(model=cfg, loss="sft")
    p_sh = shd.param_shardings(params, mesh, RULES)
    batch_sh = shd.batch_shardings(batch, mesh, RULES)
    mb = {k: v[0] for k, v in batch.items()}
    mb_sh = {k: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*s.spec[1:])) for k, s in batch_sh.items()}
    loss_fn = make_loss_fn(spec, mesh, RULES)

    def loss_in_mesh(p, mb):  # the trainer patch: the mesh is made ambient while tracing
        with shd.mesh_context(mesh):
            loss, _ = loss_fn(p, {}, mb, {})
        return loss

    grad_fn = jax.jit(jax.value_and_grad(loss_in_mesh), in_shardings=(p_sh, mb_sh))
    mb_loss, grads = grad_fn(params, mb)

    tx, sched = build_optimizer(OPT, total_steps=10)
    shapes = jax.eval_shape(lambda p: init_train_state(spec, p, tx), params)
    rep = shd.replicated(mesh)
    state_sh = {"step": rep, "params": p_sh, "opt_state": shd.opt_state_shardings(shapes["opt_state"], params, p_sh, mesh),
                "loss_state": {}, "nonfinite": rep}
    step = make_train_step(spec, tx, sched, mesh, RULES, state_sh, {}, batch_sh)
    state = jax.jit(lambda p: init_train_state(spec, p, tx), out_shardings=state_sh)(params)
    with jax.set_mesh(mesh):  # trainer.py as it is: the mesh is ambient when the step is traced
        compiled = step.lower(state, {}, batch).compile()
    hlo = compiled.as_text()
    state, metrics = compiled(state, {}, batch)
    return {"mb_loss": float(mb_loss), "grads": _tree_np(grads), "params": _tree_np(state["params"]),
            "metrics": {k: float(v) for k, v in metrics.items()},
            # ring_attention names its K/V transfers 'ring_kv' (jax.named_scope in the HLO metadata)
            "ring_in_hlo": "ring_kv" in hlo, "n_devices": int(mesh.devices.size)}


def worker(out_path: str, names: list[str]) -> None:
    assert len(jax.devices()) == 8, jax.devices()
    rng = np.random.default_rng(0)
    params = _tree_np(jax.jit(lambda r: init_params(CFG, r))(jax.random.PRNGKey(0)))  # jit: eager init is slow
    params["embed"] = params["embed"] * 0.2  # keep the initial loss near log V
    batch = sft_batch(rng)
    result: dict = {}
    ref = None
    for name, axes, layout in CASES:
        if name not in names and axes is not None:  # the reference always runs, first
            continue
        t0 = time.time()
        if axes is None:
            mesh = shd.make_mesh({}, devices=jax.devices()[:1])
            cfg, b = CFG, batch
        else:
            mesh = shd.make_mesh(axes)
            cfg = CFG.replace(attention_impl="ring")
            n = mesh.shape["sequence"]
            b = {k: to_layout(v, n, layout, axis=2) for k, v in batch.items()}
        r = run_case(cfg, params, b, mesh)
        if ref is None:
            ref = r
            # the window matters for this batch: the same reference loss without it
            result["no_window_mb_loss"] = no_window_loss(params, batch, mesh)
        leaves = lambda t: jax.tree.leaves(t)  # noqa: E731
        result[name] = {
            "mb_loss": r["mb_loss"], "metrics": r["metrics"], "ring_in_hlo": r["ring_in_hlo"],
            "n_devices": r["n_devices"],
            # per leaf: max |g - g_ref| / max |g_ref|, the worst leaf
            "grad_rel_diff": max(float(np.max(np.abs(g - h)) / np.max(np.abs(h)))
                                 for g, h in zip(leaves(r["grads"]), leaves(ref["grads"]))),
            "grad_min_scale": min(float(np.max(np.abs(h))) for h in leaves(ref["grads"])),
            "param_max_diff": max(float(np.max(np.abs(p - q))) for p, q in zip(leaves(r["params"]), leaves(ref["params"]))),
            "param_moved": max(float(np.max(np.abs(p - q))) for p, q in zip(leaves(r["params"]), leaves(params))),
            "seconds": time.time() - t0,
        }
        print(name, f"{time.time() - t0:.1f}s", flush=True)
    with open(out_path, "w") as f:
        json.dump(result, f)


# ----------------------------------------------------------------------------
# tests (pytest process, one device)


DEFAULT_CASES = ("sequence8_plain", "sequence8_zigzag")
SLOW_CASES = ("sequence8_striped", "data2_tensor2_sequence2_zigzag")


def _run_worker(tmp_path, names) -> dict:
    out = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, HERE, str(out), *names], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _run_worker(tmp_path_factory.mktemp("ring_step"), DEFAULT_CASES)


def test_reference_case_is_meaningful(results):
    ref = results["single_reference"]
    assert ref["n_devices"] == 1 and not ref["ring_in_hlo"]
    assert ref["param_moved"] > 1e-3  # the step really updates the params
    assert ref["grad_min_scale"] > 1e-6  # every leaf gets a gradient to compare
    # the local layer's window changes the loss on this batch (documents longer than 8 tokens)
    assert abs(results["no_window_mb_loss"] - ref["mb_loss"]) > 1e-4


def _check_case(results, name):
    ref, r = results["single_reference"], results[name]
    assert r["n_devices"] == 8 and r["ring_in_hlo"], name  # really ran ring attention on 8 devices
    np.testing.assert_allclose(r["mb_loss"], ref["mb_loss"], rtol=1e-5, err_msg=name)
    for k in ("loss", "grad_norm", "tokens"):
        np.testing.assert_allclose(r["metrics"][k], ref["metrics"][k], rtol=1e-5, err_msg=f"{name} {k}")
    assert r["metrics"]["skipped"] == 0.0
    assert r["grad_rel_diff"] < 1e-5, (name, r["grad_rel_diff"])
    assert r["param_max_diff"] < 1e-5, (name, r["param_max_diff"])  # updates are ~1e-2


@pytest.mark.parametrize("name", DEFAULT_CASES)
def test_ring_train_step_matches_single_device(results, name):
    _check_case(results, name)


@pytest.mark.slow
def test_ring_train_step_more_layouts_match_single_device(tmp_path):
    """Striped layout on sequence=8; zigzag with the batch on `data` and heads on `tensor`."""
    res = _run_worker(tmp_path, SLOW_CASES)
    for name in SLOW_CASES:
        _check_case(res, name)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2:])
