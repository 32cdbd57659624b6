"""Data: stdlib corpus split, packing, preference / unpaired rows, bad examples, resumable order."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from tokax.data.preference import build_code_preference_task, preference_to_unpaired
from tokax.data.stdlib import function_prefixes, read_source, split_of, stdlib_files, stdlib_root
from tokax.tokenize import train_code_tokenizer
from tokax.train import data as D

TOK = D.ByteTokenizer()


def test_stdlib_split_is_fixed_and_disjoint():
    train, ev = stdlib_files("train"), stdlib_files("eval")
    assert len(train) > 200 and 10 < len(ev) < len(train) / 5
    assert not set(train) & set(ev)
    assert all(f.endswith(".py") and "site-packages" not in f and os.sep + "test" + os.sep not in f for f in train + ev)
    root = stdlib_root()
    # the split is a pure function of the relative path
    for f in ev[:20]:
        assert split_of(os.path.relpath(f, root)) == "eval"
    assert stdlib_files("train") == train


def test_packed_iterator_fields_against_brute_force():
    pieces = ["def f(x):\n    return x\n", "a = 1\n", "class C:\n    pass\n" * 3, "print('hi')\n"] * 5
    T, B = 24, 4
    it = D.PackedTextIterator(pieces, TOK, seq_len=T, batch_size=B, grad_accum=2, seed=3)
    b = next(it)
    assert b["tokens"].shape == (2, 2, T)
    flat = {k: v.reshape(B, T) for k, v in b.items()}
    perm = np.random.default_rng([3, 0]).permutation(len(pieces))
    docs = [[TOK.bos_id] + TOK.encode(pieces[i]) + [TOK.eos_id] for i in perm]
    stream = [tok for d in docs for tok in d]
    # rows are full here; positions count from 0 at each document start AND each row start
    got = flat["tokens"].reshape(-1)
    assert (flat["positions"] >= 0).all()
    np.testing.assert_array_equal(got, np.asarray(stream[: B * T]))
    doc_start = np.cumsum([0] + [len(d) for d in docs])
    for r in range(B):
        for t in range(T):
            g = r * T + t
            d = np.searchsorted(doc_start, g, side="right") - 1
            seg_begin = max(doc_start[d], r * T)  # a document continued in a new row is a new segment
            assert flat["positions"][r, t] == g - seg_begin
            seg_end = min(doc_start[d + 1], (r + 1) * T)
            last = g == seg_end - 1
            assert flat["mask"][r, t] == (0.0 if last else 1.0)
            if not last:
                assert flat["targets"][r, t] == stream[g + 1]
            if t > 0:
                same = seg_begin <= g - 1
                assert (flat["segment_ids"][r, t] == flat["segment_ids"][r, t - 1]) == same
    assert flat["segment_ids"].min() == 1


def test_packed_iterator_resumes_exactly_and_is_seeded():
    pieces = [f"x{i} = {i * 7}\n" * (1 + i % 5) for i in range(40)]
    a = D.PackedTextIterator(pieces, TOK, 32, 4, seed=1)
    seq = [next(a) for _ in range(14)]
    b = D.PackedTextIterator(pieces, TOK, 32, 4, seed=1)
    for _ in range(5):
        next(b)
    st = b.state()
    c = D.PackedTextIterator(pieces, TOK, 32, 4, seed=1, state=st)
    for want in seq[5:]:
        got = next(c)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    assert seq[-1]["tokens"].sum() and c.state()["epoch"] >= 1  # ran past an epoch boundary
    other = next(D.PackedTextIterator(pieces, TOK, 32, 4, seed=2))
    assert not np.array_equal(other["tokens"], seq[0]["tokens"])


def test_pack_documents_reference_packer():
    out = D.pack_documents([[5, 6, 7], [8, 9], [10, 11, 12, 13]], rows=2, seq_len=5)
    np.testing.assert_array_equal(out["tokens"], [[5, 6, 7, 8, 9], [10, 11, 12, 13, 0]])
    np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 0, 1], [0, 1, 2, 3, -1]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(out["mask"], [[1, 1, 0, 1, 0], [1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(out["targets"][0, :4], [6, 7, 0, 9])


def test_preference_rows_mask_only_completion():
    ex = [{"prompt": "ab", "chosen": "cde", "rejected": "f"}, {"prompt": "xyz", "chosen": "q", "rejected": "rs"}]
    pairs, skipped = D.encode_preference(ex, TOK, seq_len=12)
    assert not skipped
    it = D.PreferenceIterator(pairs, 12, batch_size=2, shuffle=False)
    b = next(it)
    # example 0 chosen: [bos a b c d e eos] -> inputs 6 tokens, completion targets c d e eos
    ids = [TOK.bos_id] + TOK.encode("ab") + TOK.encode("cde") + [TOK.eos_id]
    np.testing.assert_array_equal(b["chosen_tokens"][0, 0, :6], ids[:-1])
    np.testing.assert_array_equal(b["chosen_targets"][0, 0, :6], ids[1:])
    np.testing.assert_array_equal(b["chosen_positions"][0, 0], [0, 1, 2, 3, 4, 5] + [-1] * 6)
    np.testing.assert_array_equal(b["chosen_mask"][0, 0], [0, 0, 1, 1, 1, 1] + [0] * 6)
    assert b["rejected_mask"][0, 0].sum() == 2  # "f" + eos
    assert b["rejected_mask"][0, 1].sum() == 3  # "rs" + eos
    # long completion is cut to fit, prompt kept whole
    pairs, _ = D.encode_preference([{"prompt": "p", "chosen": "c" * 50, "rejected": "r"}], TOK, seq_len=8)
    assert len(pairs[0][0].ids) == 8 and pairs[0][0].truncated and pairs[0][0].prompt_len == 2


def test_bad_preference_examples_error_or_logged_skip(caplog):
    good = {"prompt": "p", "chosen": "yes", "rejected": "no"}
    empty = {"prompt": "p", "chosen": "", "rejected": "no"}
    long_prompt = {"prompt": "x" * 40, "chosen": "a", "rejected": "b"}
    with pytest.raises(D.BadExampleError, match=r"example 1 field 'chosen': empty completion"):
        D.encode_preference([good, empty], TOK, seq_len=16)
    with pytest.raises(D.BadExampleError, match=r"example 0 .*prompt has 41 tokens but data.seq_len=16"):
        D.encode_preference([long_prompt], TOK, seq_len=16)
    with pytest.raises(D.BadExampleError, match="missing field"):
        D.encode_preference([{"prompt": "p", "chosen": "a"}], TOK, seq_len=16)
    with caplog.at_level(logging.WARNING, logger="tokax.train.data"):
        pairs, skipped = D.encode_preference([good, empty, long_prompt, good], TOK, seq_len=16, bad_examples="skip")
    assert len(pairs) == 2 and len(skipped) == 2
    assert sum("skipping bad example" in r.message for r in caplog.records) == 2
    with pytest.raises(D.BadExampleError, match="empty completion"):
        D.encode_unpaired([{"prompt": "p", "completion": "  ", "label": True}], TOK, 16)


def test_unpaired_rows_and_kto_mismatched_pairs():
    ex = [{"prompt": f"q{i}", "completion": "c" * (i + 1), "label": i % 2 == 0} for i in range(4)]
    enc, _ = D.encode_unpaired(ex, TOK, 16)
    b = next(D.UnpairedIterator(enc, 16, batch_size=4, grad_accum=2, shuffle=False))
    assert b["tokens"].shape == (2, 2, 16) and b["desirable"].tolist() == [[True, False], [True, False]]
    # mismatched pair of example 0: prompt 0 + completion 1 (within micro-batch 0)
    want = [TOK.bos_id] + TOK.encode("q0") + TOK.encode("cc") + [TOK.eos_id]
    np.testing.assert_array_equal(b["kl_tokens"][0, 0, : len(want) - 1], want[:-1])
    np.testing.assert_array_equal(b["kl_mask"][0, 0].sum(), 3)
    # example 1 pairs with example 0 (wraps within its micro-batch)
    assert b["kl_mask"][0, 1].sum() == 2


def test_code_preference_task_is_deterministic_and_well_formed():
    a = build_code_preference_task("eval", n=40, seed=0)
    b = build_code_preference_task("eval", n=40, seed=0)
    c = build_code_preference_task("eval", n=40, seed=1)
    assert a == b and a != c and len(a) == 40
    kinds = {e["kind"] for e in a}
    assert kinds == {"other_function", "shuffled"}
    for e in a:
        assert e["chosen"] != e["rejected"] and e["chosen"].strip() and e["prompt"].endswith("\n")
        ind = lambda s: len(s) - len(s.lstrip())  # noqa: E731
        assert ind(e["chosen"]) == ind(e["rejected"])  # indentation gives nothing away
        if e["kind"] == "shuffled":
            assert sorted(e["chosen"].split()) == sorted(e["rejected"].split())
    un = preference_to_unpaired(a)
    assert [u["label"] for u in un[:4]] == [True, False, True, False]
    assert un[1]["completion"] == a[1]["rejected"]


def test_sentencepiece_tokenizer_trains_and_roundtrips(tmp_path):
    texts = [read_source(f) for f in stdlib_files("train")[:40]]
    tok = train_code_tokenizer(texts, 400, tmp_path / "t.model")
    assert tok.vocab_size == 400 and (tmp_path / "t.model").exists()
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    src = "def f(x):\n    return x + 1  # ünïcode\n"
    assert tok.decode(tok.encode(src)) == src
    assert len(tok.encode(src)) < len(src.encode())  # it compresses


def test_function_prefixes(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(12))
    (tmp_path / "a.py").write_text(
        'def short():\n    """Doc."""\n    return 1\n\n'  # too short
        + 'def nodoc(a):\n' + body + '\n'  # no docstring
        + 'class C:\n    def method(self):\n        """Doc line."""\n'
        + "".join("    " + line for line in body.splitlines(keepends=True)) + '\n'
        + 'def second():\n    """Another."""\n' + body)
    (tmp_path / "b.py").write_text("def broken(:\n")  # does not parse: skipped
    paths = [str(tmp_path / "a.py"), str(tmp_path / "b.py")]
    got = function_prefixes(paths)
    # in ast.walk order (breadth first: top-level functions, then methods); 14 lines each -> the
    # first 4, dedented
    assert got == ['def second():\n    """Another."""\n    x0 = 0\n    x1 = 1\n',
                   'def method(self):\n    """Doc line."""\n    x0 = 0\n    x1 = 1\n']
    assert function_prefixes(paths, per_file=1) == got[:1]
    assert function_prefixes(paths, min_lines=3)[0].startswith("def short():")


def test_continuation_batch():
    from tokax.data.greedy import continuation_batch

    pairs = [(np.array([5, 6, 7]), np.array([1, 2])), (np.array([9]), np.array([3, 4]))]
    toks, lengths, at, nxt = continuation_batch(pairs)
    np.testing.assert_array_equal(toks, [[5, 6, 7, 1, 2], [9, 3, 4, 0, 0]])
    np.testing.assert_array_equal(lengths, [5, 3])
    # at[b, j] is the position whose next token is continuation token j
    np.testing.assert_array_equal(np.take_along_axis(toks, at + 1, axis=1), nxt)
    np.testing.assert_array_equal(at, [[2, 3], [0, 1]])
    assert continuation_batch(pairs, 8)[0].shape == (2, 8)
    with pytest.raises(ValueError, match="different lengths"):
        continuation_batch([(np.array([1]), np.array([2])), (np.array([1]), np.array([2, 3]))])
