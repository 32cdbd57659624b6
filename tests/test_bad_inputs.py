"""Bad inputs to every job, run through ``python -m tokax.run`` as a user would: each ends with a
non-zero exit, one ``error:`` line on stderr naming the key or file, and no traceback.

The cases run as subprocesses, two at a time (one module fixture), before any model is loaded:
each job checks its whole config and its input files first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _files(d: Path) -> dict[str, str]:
    """Input files the cases point at (written once per module)."""
    (d / "dir").mkdir()
    (d / "empty_corpus").mkdir()
    (d / "empty_corpus" / "notes.bin").write_bytes(b"\x00")
    (d / "cut.json").write_bytes(b'["caf\xc3"]')  # a prompt file cut inside a UTF-8 character
    (d / "surrogate.json").write_text('["ab\\ud800c"]')  # JSON can spell a lone surrogate
    (d / "empty.json").write_text("[]")
    (d / "numbers.json").write_text("[1, 2]")
    (d / "badhex.json").write_text('[{"hex": "zz"}]')
    ok = {"prompt": "def f(x):\n", "chosen": "    return x\n", "rejected": "    pass\n"}
    (d / "pref_bad_line.jsonl").write_text(json.dumps(ok) + "\n" + json.dumps(ok) + "\n{not json\n")
    (d / "pref_missing.jsonl").write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    (d / "a_file").write_text("not a directory")
    return {f"{{{k}}}": str(d / k) for k in ("dir", "empty_corpus", "cut.json", "surrogate.json", "empty.json",
                                              "numbers.json", "badhex.json", "pref_bad_line.jsonl",
                                              "pref_missing.jsonl", "a_file")}


def _fill(text: str, files: dict[str, str]) -> str:
    for k, v in files.items():
        text = text.replace(k, v)
    return text


GEN, SPEC, BYTE = "configs/generate.py", "configs/speculative.py", "configs/byte_sample.py"
PREF, SFT, DIST, HEADS = "configs/preference.py", "configs/sft.py", "configs/distill.py", "configs/blockwise.py"

# (id, config, overrides, text the one error line must contain); {name} is a file from _files.
CASES = [
    # decoding: prompts files
    ("prompts_dir", GEN, ["--config.prompts_file={dir}"], "--config.prompts_file='{dir}' is a directory"),
    ("prompts_not_utf8", GEN, ["--config.prompts_file={cut.json}"], "is not UTF-8 text: byte 5"),
    ("prompts_surrogate", GEN, ["--config.prompts_file={surrogate.json}"], "prompt 0 holds a lone surrogate U+D800"),
    ("prompts_empty", GEN, ["--config.prompts_file={empty.json}"], "non-empty JSON list of strings"),
    ("prompts_numbers", GEN, ["--config.prompts_file={numbers.json}"], "prompt 0 is int"),
    ("max_new_past_context", GEN, ["--config.max_new_tokens=40000"], "--config.max_new_tokens=40000 is invalid"),
    ("max_new_past_int32", GEN, ["--config.max_new_tokens=3000000000"], "--config.max_new_tokens=3000000000 is invalid"),
    ("max_new_with_prompt", GEN, ["--config.max_new_tokens=20000"], "the cache needs 32800 > the model's max_seq_len"),
    ("progress_value", GEN, ["--config.progress=maybe"], "--config.progress=maybe"),
    ("bad_float", GEN, ["--config.temperature=hot"], "--config.temperature=hot"),
    ("positional_arg", GEN, ["extra"], "unexpected arguments"),
    ("no_config_file", "configs/nope.py", [], "--config 'configs/nope.py' does not exist"),
    ("config_is_dir", "configs", [], "--config 'configs' is not a file"),
    # speculative decoding
    ("draft_bogus", SPEC + ":draft", ["--config.draft_model.name=bogus"], "--config.draft_model.name='bogus' is invalid"),
    ("draft_dir_missing", SPEC + ":dyspec", ["--config.draft_model.name=distilled:{dir}"], "holds no meta.json"),
    ("retrieval_corpus_empty", SPEC, ["--config.method=retrieval", "--config.retrieval.corpus={empty_corpus}"],
     "the directory holds no .py/.txt/.md files"),
    ("method_bogus", SPEC, ["--config.method=bogus"], "--config.method='bogus' is invalid"),
    ("k_zero", SPEC, ["--config.prompt_lookup.k=0"], "--config.prompt_lookup.k=0 is invalid"),
    ("tree_old_name", SPEC, ["--config.method=draft_tree"], "--config.method='draft_tree' is invalid"),
    ("preset_arg", SPEC + ":draft_tree", [], "unknown arg 'draft_tree'"),
    ("dyspec_nodes", SPEC + ":dyspec", ["--config.dyspec.n_nodes=0"], "--config.dyspec.n_nodes=0 is invalid"),
    ("recycling_table", SPEC + ":token_recycling", ["--config.token_recycling.table_k=1"],
     "must be >= max(branching)=3"),
    ("old_flat_key", SPEC, ["--config.k=3"], "unknown config key 'k'"),
    ("block_as_value", SPEC, ["--config.draft=truncated"], "--config.draft is a block of keys (k)"),
    ("spec_prompts_surrogate", SPEC, ["--config.prompts_file={surrogate.json}"], "lone surrogate"),
    # byte-level sampling
    ("byte_prompts_cut", BYTE, ["--config.prompts_file={cut.json}"], '{"hex": "..."}'),
    ("byte_bad_hex", BYTE, ["--config.prompts_file={badhex.json}"], "prompt 0's \"hex\" is not hex digits"),
    ("byte_mode", BYTE, ["--config.mode=bogus"], "--config.mode='bogus' is invalid"),
    ("byte_surrogate", BYTE, ["--config.prompts_file={surrogate.json}"], "lone surrogate"),
    # training: values that used to train silently
    ("batch_size_zero", PREF, ["--config.data.batch_size=0"], "--config.data.batch_size=0 is invalid"),
    ("lr_negative", PREF, ["--config.optimizer.lr=-1"], "--config.optimizer.lr=-1.0 is invalid"),
    ("total_steps_negative", PREF, ["--config.total_steps=-3"], "--config.total_steps=-3 is invalid"),
    # training: values that used to end in a traceback
    ("loss_bogus", PREF, ["--config.loss=bogus"], "--config.loss='bogus' is invalid"),
    ("loss_kwarg_foreign", PREF, ["--config.loss_kwargs.gamma=0.5"], "loss 'dpo' has no hyperparameter 'gamma'"),
    ("preset_bogus", SFT, ["--config.model.preset=huge"], "--config.model.preset='huge' is invalid"),
    ("init_bogus", SFT, ["--config.model.init=pretrained"], "--config.model.init='pretrained' is invalid"),
    ("init_checkpoint_missing", SFT, ["--config.model.init=checkpoint:{dir}"], "holds no checkpoints/"),
    ("overrides_heads", SFT, ["--config.model.overrides.n_kv_heads=3"], "must be a multiple of n_kv_heads=3"),
    ("tokenizer_bogus", SFT, ["--config.data.tokenizer=words"], "--config.data.tokenizer='words' is invalid"),
    ("spm_vocab_small", SFT, ["--config.data.vocab_size=10"], "--config.data.vocab_size=10 is invalid"),
    ("seq_len_one", SFT, ["--config.data.seq_len=1"], "--config.data.seq_len=1 is invalid"),
    ("grad_accum_split", SFT, ["--config.data.grad_accum=3"], "must be a multiple of data.grad_accum=3"),
    ("optimizer_bogus", SFT, ["--config.optimizer.name=lion"], "--config.optimizer.name='lion' is invalid"),
    ("schedule_bogus", SFT, ["--config.optimizer.schedule=step"], "--config.optimizer.schedule='step' is invalid"),
    ("warmup_negative", SFT, ["--config.optimizer.warmup_steps=-1"], "--config.optimizer.warmup_steps=-1 is invalid"),
    ("b2_one", SFT, ["--config.optimizer.b2=1.0"], "--config.optimizer.b2=1.0 is invalid"),
    ("mesh_too_big", SFT, ["--config.mesh.data=3"], "needs 3 devices"),
    ("lora_targets", PREF, ["--config.lora.enabled=True", "--config.lora.targets=('q','zz')"],
     "--config.lora.targets=('q', 'zz') is invalid"),
    ("lora_rank", PREF, ["--config.lora.enabled=True", "--config.lora.rank=0"], "--config.lora.rank=0 is invalid"),
    ("nonfinite_bogus", SFT, ["--config.nonfinite=ignore"], "--config.nonfinite='ignore' is invalid"),
    ("checkpoint_every_zero", SFT, ["--config.checkpoint_every=0"], "--config.checkpoint_every=0 is invalid"),
    ("eval_every_negative", SFT, ["--config.eval_every=-1"], "--config.eval_every=-1 is invalid"),
    ("head_vocab_negative", DIST, ["--config.head_vocab=-1"], "--config.head_vocab=-1 is invalid"),
    ("teacher_layers", DIST, ["--config.model.from_teacher_layers=(0,9)"], "layer indices must be in [0, 2)"),
    ("workdir_is_file", SFT, ["--config.workdir={a_file}"], "is a file; give a directory"),
    ("pref_data_missing", PREF, ["--config.data.path=/nonexistent/pref.jsonl"], "--config.data.path='/nonexistent/pref.jsonl'"),
    ("pref_data_bad_line", PREF, ["--config.data.path={pref_bad_line.jsonl}"], "pref_bad_line.jsonl:3: not a JSON object"),
    ("pref_data_fields", PREF, ["--config.data.path={pref_missing.jsonl}"], "example 0 (the 1th object) has fields"),
    # heads training
    ("heads_steps", HEADS, ["--config.steps=0"], "--config.steps=0 is invalid"),
    ("heads_lr", HEADS, ["--config.lr=-0.1"], "--config.lr=-0.1 is invalid"),
    ("heads_labels", HEADS, ["--config.labels=gold"], "--config.labels='gold' is invalid"),
]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.run([sys.executable, "-m", "tokax.run", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    files = _files(d)
    workdir = str(d / "workdir")  # training cases never get as far as writing here

    def argv(case):
        _, config, over, _ = case
        args = ["--config", config] + [_fill(o, files) for o in over]
        if config in (PREF, SFT, DIST, HEADS) and not any(a.startswith("--config.workdir=") for a in args):
            args.append(f"--config.workdir={workdir}")
        return args

    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = dict(zip([c[0] for c in CASES], pool.map(lambda c: _run(argv(c)), CASES)))
    return runs, files, workdir


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_it(results, case):
    runs, files, workdir = results
    r = runs[case[0]]
    want = _fill(case[3], files)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert want in lines[0], lines[0]
    assert r.stdout == ""
    assert not os.path.exists(workdir)  # checked before anything was written
