"""The launcher: overrides, error messages naming the key, JSON output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "tokax.run", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_unknown_key_is_named():
    r = run("--config", "configs/generate.py", "--config.max_new_tokenz=3")
    assert r.returncode == 2
    assert "unknown config key 'max_new_tokenz'" in r.stderr and "max_new_tokens" in r.stderr


@pytest.mark.parametrize(
    "override,needle",
    [
        ("--config.temperature=-0.5", "--config.temperature=-0.5 is invalid"),
        ("--config.top_p=1.5", "--config.top_p=1.5 is invalid"),
        ("--config.max_new_tokens=0", "--config.max_new_tokens=0 is invalid"),
        ("--config.prompts_file=/nonexistent.json", "--config.prompts_file='/nonexistent.json' does not exist"),
        ("--config.temperature=hot", "--config.temperature=hot"),
    ],
)
def test_bad_values_are_named(override, needle):
    r = run("--config", "configs/generate.py", override)
    assert r.returncode != 0
    assert needle in r.stderr


@pytest.mark.parametrize(
    "override,needle",
    [
        ("--config.verify_sizes=some", "--config.verify_sizes='some' is invalid"),
        ("--config.retrieval.corpus=nowhere", "--config.retrieval.corpus='nowhere' is invalid"),
        ("--config.retrieval.greedy_weight=0", "--config.retrieval.greedy_weight=0 is invalid"),
        ("--config.method=kangaroo --config.kangaroo.adapter=/no/adapter.npz",
         "--config.kangaroo.adapter='/no/adapter.npz' is invalid"),
        ("--config.method=specdec_pp --config.specdec_pp.head=/no/head.npz",
         "--config.specdec_pp.head='/no/head.npz' is invalid"),
    ],
)
def test_bad_speculative_values_are_named(override, needle):
    r = run("--config", "configs/speculative.py:retrieval", *override.split())
    assert r.returncode != 0
    assert needle in r.stderr


def test_prompts_file_must_be_a_list_of_strings(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"prompt": "x"}))
    r = run("--config", "configs/generate.py", f"--config.prompts_file={f}")
    assert r.returncode == 2 and "JSON list of strings" in r.stderr


@pytest.mark.slow
def test_json_output_on_gemma(tmp_path):
    prompts = ["The capital of France is", "def add(a, b):\n"]
    f = tmp_path / "p.json"
    f.write_text(json.dumps(prompts))
    r = run("--config", "configs/generate.py", f"--config.prompts_file={f}", "--config.max_new_tokens=12", "--config.json=True")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert [row["prompt"] for row in rows] == prompts
    from tokax.tokenize import load_gemma3_tokenizer

    tok = load_gemma3_tokenizer()
    for row in rows:
        assert set(row) == {"prompt", "token_ids", "text"}
        assert 1 <= len(row["token_ids"]) <= 12
        assert row["text"] == tok.decode(row["token_ids"], skip_special_tokens=True)
