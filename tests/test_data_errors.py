"""Bad data → one-line UserError naming the file (and line) and the fix; never a traceback."""

from __future__ import annotations

import json
import random

import pytest

from mlxft.config import Config
from mlxft.data import load_splits
from mlxft.errors import UserError
from tests.test_data import CONVO, chatml_tok, plain_tok, stories_tok, write_jsonl  # noqa: F401  (fixtures)

CASES = 240
GOOD = {"text": "Once upon a time"}


def fails(data, tok, match, **cfg):
    with pytest.raises(UserError, match=match) as info:
        load_splits(Config(data=str(data), **cfg), tok)
    assert "\n" not in str(info.value)
    return str(info.value)


def lines_file(tmp_path, lines, name="train.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_missing_path_and_dir_without_train(tmp_path, stories_tok):
    fails(
        tmp_path / "nope",
        stories_tok,
        r"nope: data path not found; give a directory with train.jsonl",
    )
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "valid.jsonl", [GOOD])
    fails(tmp_path / "d", stories_tok, r"d: no train.jsonl \(or train.json\) in this directory")
    with pytest.raises(UserError, match="no data"):
        load_splits(Config(), stories_tok)


def test_malformed_json_names_line(tmp_path, stories_tok):
    lines = [json.dumps(GOOD)] * 6 + ['{"text": "a" "b"}'] + [json.dumps(GOOD)] * 3
    fails(
        lines_file(tmp_path, lines),
        stories_tok,
        r"train.jsonl:7: invalid JSON \(Expecting ',' delimiter at column 14\)$",
    )


def test_blank_lines_skipped_and_line_numbers_kept(tmp_path, stories_tok):
    lines = [json.dumps(GOOD), "", "   ", json.dumps(GOOD), "", json.dumps(GOOD)]
    splits = load_splits(Config(data=str(lines_file(tmp_path, lines))), stories_tok)
    assert len(splits["train"]) + len(splits["valid"]) == 3
    fails(
        lines_file(tmp_path, lines + ["", "[1, 2]"]),
        stories_tok,
        r"train.jsonl:8: each line must be a JSON object like \{\"text\": ...\}, got \[1, 2\]",
    )


def test_record_matching_no_format_lists_keys_and_formats(tmp_path, stories_tok):
    msg = fails(
        write_jsonl(tmp_path / "train.jsonl", [GOOD, {"question": "q", "answer": "a"}]),
        stories_tok,
        r"train.jsonl:2: record matches no data format \(keys: 'question', 'answer'\); accepted:",
    )
    for fmt in ('"text"', '"prompt", "completion"', '"messages"', "alpaca", "prompt_template"):
        assert fmt in msg


@pytest.mark.parametrize(
    "record, match",
    [
        ({"text": 5}, r"train.jsonl:2: 'text' must be a string, got 5"),
        (
            {"prompt": "p", "completion": None},
            r"train.jsonl:2: 'completion' must be a string, got None",
        ),
        (
            {"instruction": "i", "input": 3, "output": "o"},
            r"train.jsonl:2: 'input' must be a string",
        ),
        (
            {"messages": "hello"},
            r"train.jsonl:2: 'messages' must be a list of \{\"role\": ..., \"content\": ...\}",
        ),
        ({"messages": []}, r"train.jsonl:2: 'messages' must be a list"),
        (
            {"messages": [{"role": "user"}]},
            r"train.jsonl:2: 'messages' must be a list .*; item 0 is \{'role': 'user'\}",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}, "hi"]},
            r"train.jsonl:2: .*item 1 is 'hi'",
        ),
    ],
)
def test_wrong_value_types(tmp_path, chatml_tok, record, match):
    first = {key: CONVO if key == "messages" else "ok" for key in record}  # same format, valid
    fails(write_jsonl(tmp_path / "train.jsonl", [first, record]), chatml_tok, match)


def test_mixed_formats_in_one_file(tmp_path, stories_tok):
    rows = [GOOD, GOOD, {"prompt": "a", "completion": "b"}]
    fails(
        write_jsonl(tmp_path / "train.jsonl", rows),
        stories_tok,
        r"train.jsonl:3: record is in 'completion' format but earlier records are 'text'; use one "
        r"format per file",
    )


def test_template_errors(tmp_path, stories_tok):
    rows = [
        {"Question": "q", "Complex_CoT": "c", "Response": "r"},
        {"Question": "q", "Response": "r"},
    ]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    both = dict(
        prompt_template="Question: {Question}\n", completion_template="{Complex_CoT}\n{Response}"
    )
    fails(
        data,
        stories_tok,
        r"train.jsonl:2: record has no field 'Complex_CoT' used by completion_template",
        **both,
    )
    fails(
        data,
        stories_tok,
        r"prompt_template is set but completion_template is not",
        prompt_template="Question: {Question}\n",
    )
    fails(
        data,
        stories_tok,
        r"completion_template: cannot fill it from .*train.jsonl:\d",
        prompt_template="{Question}",
        completion_template="{Response} }",
    )


def test_empty_file_unsupported_extension_and_duplicates(tmp_path, stories_tok):
    fails(lines_file(tmp_path, ["", "  "]), stories_tok, r"train.jsonl: no records")
    (tmp_path / "empty.json").write_text("[]")
    fails(tmp_path / "empty.json", stories_tok, r"empty.json: no records")
    (tmp_path / "data.txt").write_text("text\nhello\n")
    fails(
        tmp_path / "data.txt",
        stories_tok,
        r"data.txt: unsupported data file type '.txt'; use .jsonl",
    )
    (tmp_path / "scalar.json").write_text("42")
    fails(
        tmp_path / "scalar.json",
        stories_tok,
        r"scalar.json: a .json data file must be an array of objects, got int",
    )
    d = tmp_path / "dup"
    write_jsonl(d / "train.jsonl", [GOOD, GOOD])
    (d / "train.json").write_text(json.dumps([GOOD, GOOD]))
    fails(d, stories_tok, r"both train.jsonl and train.json exist; keep one")
    fails(
        write_jsonl(tmp_path / "one.jsonl", [GOOD]),
        stories_tok,
        r"one.jsonl: only 1 record; need at least 2",
    )


def test_not_utf8(tmp_path, stories_tok):
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"text": "caf\xe9"}\n')
    fails(path, stories_tok, r"train.jsonl:2: not UTF-8 text")


def test_chat_template_errors_name_the_record(tmp_path, chatml_tok):
    strict = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('conversations must start with "
        "user') }}"
        "{% endif %}" + "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    rows = [{"messages": CONVO[1:3]}, {"messages": CONVO}]
    fails(
        write_jsonl(tmp_path / "train.jsonl", rows),
        chatml_tok,
        r"train.jsonl:2: the chat template failed on this record: conversations must start with "
        r"user",
        chat_template=strict,
    )
    counting = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    fails(
        write_jsonl(tmp_path / "train.jsonl", [{"messages": CONVO}] * 2),
        chatml_tok,
        r"train.jsonl:\d: mask_prompt needs a chat template whose rendering of the first turns is "
        r"a prefix",
        chat_template=counting,
        mask_prompt=True,
    )
    # the same template is fine without mask_prompt
    load_splits(Config(data=str(tmp_path / "train.jsonl"), chat_template=counting), chatml_tok)
    fails(
        tmp_path / "train.jsonl",
        chatml_tok,
        r"chat_template: 'chatml' is neither an existing file nor a jinja",
        chat_template="chatml",
    )


def _garble(rng: random.Random, line: str) -> str:
    chars = list(line)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        pos = rng.randrange(len(chars) + 1)
        if op < 0.4 and chars:
            del chars[min(pos, len(chars) - 1)]
        elif op < 0.8:
            chars.insert(pos, rng.choice('{}[]":,\\ \n\t0-eE.nultrfa\u00e9\ud83d\x00'))
        else:
            chars[pos:pos] = list(
                rng.choice(['"messages"', '"text"', "null", "[", "{", "1e999", '"role"', "[]"])
            )
    return "".join(chars)


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, 0, -1, 2.5, float("nan")])
    if kind in (2, 3, 4):
        return rng.choice(
            ["", "hi", "user", "assistant", "system", "{x}", "</s>", "<|im_end|>", "é" * 3]
        )
    if kind in (5, 6):
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    keys = [
        "role",
        "content",
        "text",
        "prompt",
        "completion",
        "messages",
        "instruction",
        "input",
        "output",
    ]
    return {rng.choice(keys): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fuzz_bad_lines_raise_only_user_errors(tmp_path, stories_tok, chatml_tok):
    rng = random.Random(1234)
    seeds = [
        json.dumps(GOOD),
        json.dumps({"messages": CONVO}),
        json.dumps({"prompt": "p", "completion": "c"}),
        json.dumps({"instruction": "i", "input": "", "output": "o"}),
    ]
    outcomes = {"ok": 0, "user_error": 0}
    for case in range(CASES):
        base = rng.choice(seeds)
        if case % 3 == 0:  # structurally valid JSON, random shapes and types
            keys = [
                "text",
                "prompt",
                "completion",
                "messages",
                "instruction",
                "input",
                "output",
                "x",
            ]
            bad = json.dumps(
                {rng.choice(keys): _random_value(rng) for _ in range(rng.randint(1, 3))}
            )
        else:
            bad = _garble(rng, base)
        path = tmp_path / f"case{case}.{'json' if case % 7 == 0 else 'jsonl'}"
        body = "\n".join([base, bad, base])
        path.write_bytes(body.encode("utf-8", "surrogatepass"))
        cfg = Config(
            data=str(path), mask_prompt=bool(case % 2), max_seq_length=rng.choice([2, 8, 64])
        )
        try:
            load_splits(cfg, chatml_tok if case % 4 else stories_tok)
            outcomes["ok"] += 1
        except UserError as err:
            assert "\n" not in str(err) and str(path.name) in str(err)
            outcomes["user_error"] += 1
    assert outcomes["ok"] > 10 and outcomes["user_error"] > 100


def test_malformed_json_array_names_file_line(tmp_path, stories_tok):
    (tmp_path / "data.json").write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    fails(
        tmp_path / "data.json",
        stories_tok,
        r"data.json:3: invalid JSON \(Expecting property name enclosed",
    )
    (tmp_path / "items.json").write_text('[{"text": "a"}, "b"]')
    fails(tmp_path / "items.json", stories_tok, r"items.json\[1\]: each item must be a JSON object")
