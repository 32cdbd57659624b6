"""Trainer: gradient accumulation, non-finite steps, preference metrics, event files, kill and resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokax.model.config import tiny
from tokax.model.decoder import init_params
from tokax.data.preference import build_code_preference_task, write_jsonl
from tokax.data.stdlib import corpus_pieces, frequent_token_ids
from tokax.train import data as D
from tokax.train import sharding as shd
from tokax.train.metrics import MetricsLogger, read_events
from tokax.train.optim import build_optimizer, build_schedule
from tokax.train.step import StepSpec, init_train_state, make_train_step
from tokax.train.trainer import run

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
from tokax.testing import load_config  # noqa: E402

SMALL = {  # a run that compiles and steps in seconds on CPU
    "data.tokenizer": "bytes",
    "data.max_files": 12,
    "data.seq_len": 32,
    "data.batch_size": 4,
    "data.eval_batch_size": 4,
    "model.overrides.d_model": 32,
    "model.overrides.ffn_dim": 64,
    "model.overrides.head_dim": 8,
    "progress": False,
    "eval_every": 0,
    "log_every": 1,
}


def small_config(path: str, workdir, **kw):
    return load_config(os.path.join(ROOT, "configs", path), {**SMALL, "workdir": str(workdir), **kw})


def read_metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


# ----------------------------------------------------------------------------
# pieces
# ----------------------------------------------------------------------------


def test_event_file_roundtrip(tmp_path):
    # the scalars tensorboardX writes read back, checksums checked, one event per logged step
    w = MetricsLogger(str(tmp_path))
    w.write(1, {"loss": 2.5, "lr": 1e-3})
    w.write(2, {"loss": 1.25})
    w.close()
    (name,) = os.listdir(tmp_path / "tb")
    ev = read_events(str(tmp_path / "tb" / name))
    assert [s for s, _ in ev] == [1, 2]
    assert ev[0][1]["loss"] == 2.5 and math.isclose(ev[0][1]["lr"], 1e-3, rel_tol=1e-6)


def test_schedule_values():
    s = build_schedule({"lr": 1.0, "warmup_steps": 4, "schedule": "cosine", "final_lr_ratio": 0.1}, total_steps=14)
    assert float(s(0)) == 0.0 and math.isclose(float(s(2)), 0.5)
    assert math.isclose(float(s(4)), 1.0, rel_tol=1e-6)
    # cosine from 1 to 0.1 over the 10 steps after warmup
    assert math.isclose(float(s(9)), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 10)), rel_tol=1e-5)
    assert math.isclose(float(s(14)), 0.1, rel_tol=1e-5)
    lin = build_schedule({"lr": 2.0, "schedule": "linear", "final_lr_ratio": 0.0}, total_steps=10)
    assert math.isclose(float(lin(5)), 1.0, rel_tol=1e-6)
    with pytest.raises(ValueError, match="optimizer.schedule"):
        build_schedule({"lr": 1.0, "schedule": "step"}, 10)


def test_first_update_uses_first_warmup_lr():
    # sgd moves a parameter by -lr * grad: the n-th update must use s(n), so the first one is not a no-op
    opt = {"name": "sgd", "lr": 1.0, "warmup_steps": 4, "schedule": "constant"}
    tx, s = build_optimizer(opt, total_steps=10)
    p = jnp.zeros(())
    st = tx.init(p)
    moves = []
    for _ in range(6):
        u, st = tx.update(jnp.ones(()), st, p)
        moves.append(-float(u))
    np.testing.assert_allclose(moves, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0], rtol=1e-6)
    assert [float(s(n)) for n in (1, 4)] == [0.25, 1.0]


CFG = tiny(vocab_size=64, n_layers=1)


@pytest.fixture(scope="module")
def sgd_step():
    """One compiled SFT train step (plain SGD, so the update is -lr * gradient) and its inputs."""
    params = jax.jit(lambda k: init_params(CFG, k))(jax.random.PRNGKey(0))
    mesh = shd.make_mesh({}, devices=jax.devices()[:1])
    spec = StepSpec(model=CFG, loss="sft")
    tx, sched = build_optimizer({"name": "sgd", "lr": 0.5, "schedule": "constant"}, 10)
    rep = shd.replicated(mesh)
    p_sh = shd.param_shardings(params, mesh, ())
    state_sh = {"step": rep, "params": p_sh, "opt_state": rep, "loss_state": {}, "nonfinite": rep}

    def step_for(batch):
        return make_train_step(spec, tx, sched, mesh, (), state_sh, {}, shd.batch_shardings(batch, mesh, ()))

    return params, tx, spec, step_for


def _packed(A, b, seed=0):
    rng = np.random.default_rng(seed)
    docs = [list(rng.integers(4, 64, rng.integers(3, 12))) for _ in range(40)]
    out = D.pack_documents(docs, A * b, 16)
    return {k: v.reshape(A, b, 16) for k, v in out.items()}


def test_grad_accumulation_equals_one_big_batch(sgd_step):
    params, tx, spec, step_for = sgd_step
    big = _packed(1, 4)
    acc = {k: v.reshape(2, 2, 16) for k, v in big.items()}
    # rows with very different token counts: a plain mean of micro-batch means would differ
    assert acc["mask"][0].sum() != acc["mask"][1].sum()
    s1, m1 = step_for(big)(init_train_state(spec, params, tx), {}, big)
    s2, m2 = step_for(acc)(init_train_state(spec, params, tx), {}, acc)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    assert float(m1["tokens"]) == big["mask"].sum() == float(m2["tokens"])
    for a, b, p in zip(jax.tree.leaves(s2["params"]), jax.tree.leaves(s1["params"]), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # and the loss is the token-mean NLL computed independently with a log-softmax in numpy
    from tokax.model.decoder import forward

    logits, _, _ = forward(CFG, params, big["tokens"][0], big["positions"][0], segment_ids=big["segment_ids"][0])
    lg = np.asarray(logits, np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    lp = np.take_along_axis(lg, big["targets"][0][..., None], -1)[..., 0] - lse
    m = big["mask"][0]
    np.testing.assert_allclose(float(m1["loss"]), -(lp * m).sum() / m.sum(), rtol=1e-5)


def test_nonfinite_step_is_skipped_not_applied(sgd_step):
    params, tx, spec, step_for = sgd_step
    batch = _packed(1, 4, seed=1)
    bad = jax.tree.map(lambda x: x, params)
    bad["layer_0"] = dict(bad["layer_0"])
    bad["layer_0"]["up"] = bad["layer_0"]["up"].at[0, 0].set(jnp.nan)
    st = init_train_state(spec, bad, tx)
    new, m = step_for(batch)(st, {}, batch)
    assert float(m["skipped"]) == 1.0 and not math.isfinite(float(m["loss"]))
    assert int(new["nonfinite"]) == 1 and int(new["step"]) == 1
    for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(bad)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # NaN stays where it was, nothing else moved
    ok, m2 = step_for(batch)(init_train_state(spec, params, tx), {}, batch)
    assert float(m2["skipped"]) == 0.0 and int(ok["nonfinite"]) == 0


# ----------------------------------------------------------------------------
# run(config)
# ----------------------------------------------------------------------------


def test_nan_loss_run_logs_skips_then_stops(tmp_path, capsys):
    # z_loss = nan is a bad hyperparameter that makes every loss NaN.
    # 'skip': each bad step is logged and skipped; too many in a row stop the run with a clear error
    cfg = small_config("sft.py", tmp_path / "skip", total_steps=6, nonfinite="skip", max_consecutive_nonfinite=3)
    cfg.loss_kwargs.z_loss = float("nan")
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite steps up to step 3"):
        run(cfg)
    rows = read_metrics(tmp_path / "skip")
    assert [r["skipped"] for r in rows] == [1.0, 1.0, 1.0] and rows[0]["loss"] is None
    assert capsys.readouterr().err.count("update skipped (params unchanged)") == 3


@pytest.mark.slow
def test_nan_loss_run_error_mode(tmp_path):
    cfg = small_config("sft.py", tmp_path / "err", total_steps=3, nonfinite="error")
    cfg.loss_kwargs.z_loss = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite loss at step 1"):
        run(cfg)
    assert read_metrics(tmp_path / "err")[0]["skipped"] == 1.0


def test_dpo_lora_run_metrics_and_bad_examples(tmp_path):
    # byte tokens: keep the prompts short so that pairs fit seq_len
    rows = [{**r, "prompt": r["prompt"][-40:]} for r in build_code_preference_task("eval", n=24, seed=0)]
    rows[3] = {**rows[3], "chosen": ""}  # empty completion
    rows[5] = {**rows[5], "prompt": "x = 1\n" * 40}  # prompt longer than seq_len
    write_jsonl(tmp_path / "pref.jsonl", rows)
    common = dict(total_steps=3, eval_every=3, eval_batches=1, **{
        "data.path": str(tmp_path / "pref.jsonl"), "data.eval_path": str(tmp_path / "pref.jsonl"),
        "data.seq_len": 160, "lora.enabled": True, "lora.rank": 2})
    with pytest.raises(D.BadExampleError, match="example 3 field 'chosen': empty completion"):
        run(small_config("preference.py", tmp_path / "strict", **{**common, "data.bad_examples": "error"}))
    out = run(small_config("preference.py", tmp_path / "w", **{**common, "data.bad_examples": "skip"}))
    m = read_metrics(tmp_path / "w")
    assert [r["step"] for r in m] == [0, 1, 2, 3]  # step 0: the starting model, evaluated before any update
    zero, first = m[0], m[1]
    # LoRA's B starts at 0: policy == reference, so DPO's loss is log 2 and KL and margins are 0
    assert math.isclose(zero["loss"], math.log(2), rel_tol=1e-5) and math.isclose(zero["eval/loss"], math.log(2), rel_tol=1e-5)
    assert zero["eval/rewards/margins"] == 0.0 and zero["eval/rewards/accuracies"] == 0.0
    assert math.isclose(first["loss"], math.log(2), rel_tol=1e-5)
    assert abs(first["rewards/margins"]) < 1e-5 and abs(first["kl_ref"]) < 1e-5
    for k in ("grad_norm", "lr", "tokens_per_s", "logps/chosen", "logps/rejected", "rewards/accuracies"):
        assert math.isfinite(first[k]), k
    assert m[-1]["kl_ref"] > 0 and "eval/rewards/accuracies" in m[-1] and out["step"] == 3
    # TensorBoard scalars mirror metrics.jsonl
    tb = os.path.join(tmp_path / "w", "tb")
    ev = read_events(os.path.join(tb, os.listdir(tb)[0]))
    assert [s for s, _ in ev] == [0, 1, 2, 3]
    assert math.isclose(ev[3][1]["loss"], m[3]["loss"], rel_tol=1e-6)


def _worker(config, overrides, pause=0.0):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.Popen([sys.executable, os.path.join(HERE, "run_worker.py"), os.path.join(ROOT, "configs", config),
                             json.dumps(overrides), str(pause)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_killed_run_resumes_and_matches_uninterrupted(tmp_path):
    over = {**SMALL, "total_steps": 12, "checkpoint_every": 3, "seed": 7}
    # the uninterrupted reference
    ref_dir = tmp_path / "ref"
    ref = _worker("sft.py", {**over, "workdir": str(ref_dir)})
    # the run that is killed mid-way (each step paused so the kill lands between checkpoints)
    kill_dir = tmp_path / "kill"
    p = _worker("sft.py", {**over, "workdir": str(kill_dir)}, pause=0.4)
    deadline = time.time() + 300
    while time.time() < deadline:
        rows = read_metrics(kill_dir) if os.path.exists(kill_dir / "metrics.jsonl") else []
        if rows and rows[-1]["step"] >= 7:
            break
        assert p.poll() is None, p.stdout.read()
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    killed_at = read_metrics(kill_dir)[-1]["step"]
    assert 7 <= killed_at < 12
    r = _worker("sft.py", {**over, "workdir": str(kill_dir)})
    out, _ = r.communicate(timeout=300)
    assert r.returncode == 0, out[-3000:]
    final = json.loads(out.split("FINAL ", 1)[1])
    assert 3 <= final["resumed_from"] <= killed_at and final["resumed_from"] % 3 == 0
    ref_out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_out[-3000:]
    want = read_metrics(ref_dir)
    got = read_metrics(kill_dir)
    assert [x["step"] for x in got] == list(range(1, 13))  # entries after the checkpoint were redone once
    # same program, same inputs, same restored state: the curves agree to the bit
    assert [x["loss"] for x in got] == [x["loss"] for x in want]
    assert [x["grad_norm"] for x in got] == [x["grad_norm"] for x in want]


def test_treg_step_uses_contrastive_reference_rewards():
    """The trainer's T-REG loss equals the formula computed from independent per-sequence forwards:
    policy/reference log-probs of each completion token, and the reference's log-probs of the same
    tokens with the 'better' / 'worse' instruction written between BOS and the prompt."""
    from tokax.model.decoder import forward
    from tokax.train.step import make_loss_fn

    rng = np.random.default_rng(3)
    params = jax.jit(lambda k: init_params(CFG, k))(jax.random.PRNGKey(1))
    ref = jax.tree.map(lambda x: x + 0.05 * jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
    better, worse = (5, 6, 7), (8, 9)
    spec = StepSpec(model=CFG, loss="treg", loss_kwargs=(("alpha", 0.5), ("beta", 0.3)),
                    contrastive_prefixes=(better, worse), log_ref_kl=False)
    T, bos = 16, 2
    seqs = {}
    for side in ("chosen", "rejected"):
        rows = []
        for _ in range(3):
            prompt = list(rng.integers(10, 64, rng.integers(2, 6)))
            comp = list(rng.integers(10, 64, rng.integers(1, 6)))
            rows.append((prompt, comp))
        seqs[side] = rows

    def arrays(rows):
        tok = np.zeros((len(rows), T), np.int32)
        tgt = np.zeros_like(tok)
        pos = np.full_like(tok, -1)
        mask = np.zeros(tok.shape, np.float32)
        for i, (p, c) in enumerate(rows):
            s = [bos] + p + c
            tok[i, : len(s)] = s
            tgt[i, : len(s) - 1] = s[1:]
            pos[i, : len(s)] = np.arange(len(s))
            mask[i, len(p) : len(s) - 1] = 1.0  # targets that are completion tokens
        return tok, tgt, pos, mask

    mb = {}
    for side, rows in seqs.items():
        for k, v in zip(("tokens", "targets", "positions", "mask"), arrays(rows)):
            mb[f"{side}_{k}"] = jnp.asarray(v)
    loss, (metrics, _, _) = jax.jit(make_loss_fn(spec))(params, {"ref": ref}, mb, {})

    def comp_logps(p, prefix, prompt, comp):
        s = [bos] + list(prefix) + prompt + comp
        lg, _, _ = forward(CFG, p, jnp.asarray([s]), jnp.arange(len(s))[None])
        lg = np.asarray(lg[0], np.float64)
        lsm = lg - (np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) + lg.max(-1, keepdims=True))
        start = 1 + len(prefix) + len(prompt)  # index of the first completion token
        return np.array([lsm[start + j - 1, comp[j]] for j in range(len(comp))])

    beta, alpha = 0.3, 0.5
    seq_r, agree = {}, {}
    for side, rows in seqs.items():
        seq_r[side], agree[side] = [], []
        for p, c in rows:
            rho = beta * (comp_logps(params, (), p, c) - comp_logps(ref, (), p, c))
            rhat = 1 / (1 + np.exp(-(comp_logps(ref, better, p, c) - comp_logps(ref, worse, p, c)))) - 0.5
            seq_r[side].append(rho.sum())
            agree[side].append((rhat * rho).sum())
    h = np.array(seq_r["chosen"]) - np.array(seq_r["rejected"])
    w = 1 / (1 + np.exp(h))
    want = np.mean(np.log1p(np.exp(-h)) + alpha * w * -(np.array(agree["chosen"]) + np.array(agree["rejected"])))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["treg/agreement_chosen"]), np.mean(agree["chosen"]), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="contrastive_prefixes"):
        StepSpec(model=CFG, loss="treg")


def test_distill_with_head_subset_is_the_conditional_kl():
    """config.head_vocab: the distillation loss is KL(p_T(.|S) || p_S(.|S)) over the head's token
    subset S, computed here in numpy from independent full-vocabulary forwards of both models,
    and top1_agree is the fraction of positions where the two argmaxes over S coincide."""
    from tokax.model.decoder import forward
    from tokax.train.step import make_loss_fn

    teacher_cfg = tiny(vocab_size=64, n_layers=2)
    params = jax.jit(lambda k: init_params(CFG, k))(jax.random.PRNGKey(1))
    teacher = jax.jit(lambda k: init_params(teacher_cfg, k))(jax.random.PRNGKey(2))
    spec = StepSpec(model=CFG, loss="distill", teacher=teacher_cfg)
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(64, size=20, replace=False)).astype(np.int32)
    T = 12
    tokens = rng.integers(0, 64, (2, T)).astype(np.int32)
    pos = np.tile(np.arange(T, dtype=np.int32), (2, 1))
    mask = np.ones((2, T), np.float32)
    mask[1, 8:] = 0.0
    mb = {"tokens": jnp.asarray(tokens), "positions": jnp.asarray(pos), "segment_ids": None,
          "targets": jnp.asarray(np.roll(tokens, -1, 1)), "mask": jnp.asarray(mask)}
    frozen = {"teacher": teacher, "head_ids": jnp.asarray(ids)}
    loss, (metrics, _, _) = jax.jit(make_loss_fn(spec))(params, frozen, mb, {})

    def sub_logp(cfg, p):
        lg = np.asarray(forward(cfg, p, jnp.asarray(tokens), jnp.asarray(pos))[0], np.float64)[..., ids]
        m = lg.max(-1, keepdims=True)
        return lg - m - np.log(np.exp(lg - m).sum(-1, keepdims=True))

    ls, lt = sub_logp(CFG, params), sub_logp(teacher_cfg, teacher)
    kl = (np.exp(lt) * (lt - ls)).sum(-1)
    m = mask.astype(bool)
    np.testing.assert_allclose(float(loss), kl[m].mean(), rtol=1e-5)
    agree = (ls.argmax(-1) == lt.argmax(-1))[m].mean()
    np.testing.assert_allclose(float(metrics["top1_agree"]), agree, atol=1e-6)


def test_frequent_token_ids_counts_the_corpus():
    """The head vocabulary is the n most frequent ids of the corpus (byte tokenizer: a direct count)."""
    import collections

    tok = D.get_tokenizer("bytes")
    n = 40
    ids = frequent_token_ids(tok, n, split="eval", max_files=3)
    counts = collections.Counter()
    for piece in corpus_pieces("eval", max_files=3):
        counts.update(tok.encode(piece))
    assert len(ids) == n and list(ids) == sorted(ids)
    special = {i for i in (tok.bos_id, tok.eos_id) if i is not None}
    assert special <= set(ids.tolist())
    threshold = sorted(counts.values(), reverse=True)[n - len(special) - 1]
    assert all(counts[i] >= threshold for i in ids if i not in special)
    assert all(counts[i] <= threshold for i in range(tok.vocab_size) if i not in ids)
