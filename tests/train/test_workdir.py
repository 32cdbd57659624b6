"""A training workdir is safe to rerun into: a changed config is refused (with the keys named),
a second run into a locked workdir is refused, a corrupted latest checkpoint falls back to the
one before it and the loss curve continues exactly; and a CLI run's stderr at default verbosity
holds only tokax's own lines."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tokax.testing import cli_overrides, load_config
from tokax.train.checkpoint import CheckpointError
from tokax.train.trainer import run
from tokax.train.workdir import WorkdirError, WorkdirLock

ROOT = Path(__file__).resolve().parents[2]
SFT = str(ROOT / "configs" / "sft.py")
SMALL = {  # seconds on CPU: a tiny decoder on byte tokens
    "data.tokenizer": "bytes", "data.max_files": 12, "data.seq_len": 32, "data.batch_size": 4,
    "data.eval_batch_size": 4, "model.overrides.d_model": 32, "model.overrides.ffn_dim": 64,
    "model.overrides.head_dim": 8, "eval_every": 0, "log_every": 1, "total_steps": 6, "checkpoint_every": 2,
    "keep_checkpoints": 2, "async_checkpoint": False, "seed": 3,
}


def cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "tokax.run", "--config", SFT, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)


def metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def config(workdir, **kw):
    return load_config(SFT, {**SMALL, "workdir": str(workdir), **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted CLI run: 6 steps, checkpoints at 4 and 6 kept."""
    workdir = tmp_path_factory.mktemp("workdir") / "run"
    r = cli(*cli_overrides({**SMALL, "workdir": str(workdir)}))
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir, r


def copy_of(trained, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(trained[0], dst)
    cfg_path = dst / "config.json"
    saved = json.loads(cfg_path.read_text())
    saved["workdir"] = str(dst)
    cfg_path.write_text(json.dumps(saved))
    return dst


def test_cli_run_stderr_holds_only_tokax_lines_and_stdout_the_summary(trained):
    workdir, r = trained
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert all(ln.startswith("[tokax") for ln in err), err  # no orbax / absl / JAX lines, no escape codes
    assert "\x1b[" not in r.stdout + r.stderr
    out = r.stdout
    assert "trained sft to step 6/6" in out and f"workdir: {workdir}" in out
    assert f"checkpoint: {workdir / 'checkpoints' / '6'}" in out
    assert f"loss {metrics(workdir)[-1]['loss']:.4g}" in out
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6"]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["loss"] == "sft" and saved["model"]["overrides"]["d_model"] == 32


@pytest.mark.parametrize("change,named", [
    ({"loss_kwargs.z_loss": 0.01}, "loss_kwargs.z_loss: 0.0001 -> 0.01"),
    ({"model.overrides.d_model": 48}, "model.overrides.d_model: 32 -> 48"),
    ({"total_steps": 9}, "total_steps: 6 -> 9"),
])
def test_config_change_is_refused_naming_the_keys(trained, change, named):
    workdir, _ = trained
    before = (workdir / "metrics.jsonl").read_text(), (workdir / "config.json").read_text()
    r = cli(*cli_overrides({**SMALL, "workdir": str(workdir), **change}))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and named in lines[0] and "--config.allow_config_change=True" in lines[0], lines
    assert ((workdir / "metrics.jsonl").read_text(), (workdir / "config.json").read_text()) == before


def test_presentation_keys_may_change_and_a_finished_run_trains_nothing(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    out = run(config(workdir, log_every=3, checkpoint_every=5, progress=False))
    assert out["resumed_from"] == 6 and out["step"] == 6
    assert [m["step"] for m in metrics(workdir)] == list(range(1, 7))


def test_allowed_change_keeps_the_old_config(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    out = run(config(workdir, total_steps=7, allow_config_change=True))
    assert out["resumed_from"] == 6 and out["step"] == 7
    kept = [f for f in os.listdir(workdir) if f.startswith("config.") and f != "config.json"]
    assert len(kept) == 1 and json.loads((workdir / kept[0]).read_text())["total_steps"] == 6
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == 7


def test_second_run_into_a_locked_workdir_is_refused(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    holder = WorkdirLock(str(workdir))  # another run holds the workdir
    try:
        r = cli(*cli_overrides({**SMALL, "workdir": str(workdir)}))
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert f"workdir {workdir} is in use by another training run (pid {os.getpid()}" in r.stderr
        with pytest.raises(WorkdirError, match="is in use by another training run"):
            run(config(workdir))
    finally:
        holder.release()
    assert len(metrics(workdir)) == 6  # no row written twice
    WorkdirLock(str(workdir)).release()  # free again once the holder is done


def _corrupt(step_dir: Path) -> None:
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":  # the array data of orbax's OCDBT store
            f.write_bytes(os.urandom(64))


def test_corrupted_latest_checkpoint_falls_back_and_the_curve_continues_exactly(trained, tmp_path, capsys):
    want = metrics(trained[0])
    workdir = copy_of(trained, tmp_path)
    _corrupt(workdir / "checkpoints" / "6")
    out = run(config(workdir))
    err = capsys.readouterr().err
    assert "checkpoint step 6 is unreadable" in err and "fell back to the newest intact checkpoint, step 4" in err
    assert out["resumed_from"] == 4 and out["step"] == 6
    got = metrics(workdir)
    assert [m["step"] for m in got] == list(range(1, 7))
    assert [m["loss"] for m in got] == [m["loss"] for m in want]  # to the bit: same state, same batches
    assert [m["grad_norm"] for m in got] == [m["grad_norm"] for m in want]
    (moved,) = os.listdir(workdir / "corrupt_checkpoints")  # set aside, not deleted
    assert moved.startswith("6.")
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6"]  # step 6 written again


def test_no_restorable_checkpoint_names_every_step_and_moves_nothing(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    for s in ("4", "6"):
        _corrupt(workdir / "checkpoints" / s)
    with pytest.raises(CheckpointError, match="step 6: .*step 4: "):
        run(config(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6"]
    assert not (workdir / "corrupt_checkpoints").exists()


def test_workdir_without_config_json_is_checked_against_its_checkpoints(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    os.remove(workdir / "config.json")  # a workdir written before config.json existed
    with pytest.raises(WorkdirError, match="model.d_model: 32 -> 48"):
        run(config(workdir, **{"model.overrides.d_model": 48}))
