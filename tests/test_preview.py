"""`mlxft data`: the marked spans are the trainer's own target masks, and the figures (token counts,
truncated/dropped, histogram, padding share) are the ones training would report."""

from __future__ import annotations

import json
import re

import numpy as np
from click.testing import CliRunner

from mlxft.cli import main
from mlxft.config import build_config
from mlxft.data import epoch_batches, load_splits, pad_token_id, padding_fraction
from mlxft.data.preview import GREEN, RESET, spans
from mlxft.hub import load_tokenizer
from tests.test_data import CONVO, wikisql_texts, write_jsonl


def run(*args):
    return CliRunner().invoke(main, ["data", *[str(a) for a in args]])


def test_chat_preview_brackets_exactly_the_assistant_turns(tiny_llama, tmp_path):
    data = tmp_path / "chat"
    write_jsonl(data / "train.jsonl", [{"messages": CONVO}] * 4)
    write_jsonl(data / "valid.jsonl", [{"messages": CONVO}])
    result = run("--model", tiny_llama, "--data", data, "--mask-prompt", "-n", "1")
    assert result.exit_code == 0, result.output
    rendered = result.stdout.split("--- train example 1:")[1].split("\n", 1)[1]
    # ChatML: each assistant reply and its end-of-turn marker train, nothing else does
    assert re.findall(r"\[\[(.*?)\]\]", rendered, flags=re.S) == [
        "yo<|im_end|>\n",
        "SELECT 1<|im_end|>\n",
    ]
    assert rendered.replace("[[", "").replace("]]", "").rstrip("\n") == load_tokenizer(
        tiny_llama, build_config(overrides={})
    ).apply_chat_template(CONVO, tokenize=False).rstrip("\n")
    assert "format chat" in result.stdout


def test_spans_are_the_token_masks_decoded_in_context(stories):
    """Marks come from the masks, token for token: re-tokenizing each span in order gives back the
    sequence, and the marked tokens are exactly the masked ones (SentencePiece spaces included)."""
    tok = load_tokenizer(stories, build_config(overrides={}))
    text = "Once upon a time, there was a little girl named Lily."
    ids = tok(text)["input_ids"]
    mask = np.zeros(len(ids), dtype=bool)
    mask[3:7] = True
    mask[9:] = True
    runs = spans(tok, ids, mask)
    assert [trained for _, trained in runs] == [False, True, False, True]
    assert "".join(t for t, _ in runs) == tok.decode(ids, skip_special_tokens=False)
    pieces = lambda a, b: "".join(tok.convert_ids_to_tokens(ids[a:b])).replace("\u2581", " ")  # noqa: E731
    assert [t for t, trained in runs if trained] == [pieces(3, 7), pieces(9, len(ids))]
    assert runs[1][0].startswith(" ")  # the leading space a token-by-token decode would drop


def test_figures_match_the_trainer(stories, tmp_path):
    rows = [{"text": t} for t in wikisql_texts(40)] + [{"text": "word " * 300}]
    write_jsonl(tmp_path / "d" / "train.jsonl", rows)
    write_jsonl(tmp_path / "d" / "valid.jsonl", rows[:3])
    args = [
        "--model",
        stories,
        "--data",
        tmp_path / "d",
        "--max-seq-length",
        "200",
        "--batch-size",
        "3",
        "-n",
        "2",
    ]
    result = run(*args)
    assert result.exit_code == 0, result.output
    cfg = build_config(
        overrides={
            "model": str(stories),
            "data": str(tmp_path / "d"),
            "max_seq_length": 200,
            "batch_size": 3,
        }
    )
    tok = load_tokenizer(stories, cfg)
    splits = load_splits(cfg, tok)
    train = splits["train"]
    total = sum(len(s) for s in train.sequences)
    trained = sum(int(m.sum()) for m in train.masks)
    out = result.stdout
    assert f"Data train: {len(train)} examples, format text" in out
    assert f"tokens {total} ({trained} trained" in out
    assert f"{train.truncated} truncated to max_seq_length 200" in out and train.truncated >= 1
    pad = padding_fraction(epoch_batches(train, 3, seed=0, epoch=0, pad_id=pad_token_id(tok)))
    assert f"padding {100 * pad:.1f}% of batch positions" in out
    bars = [line for line in out.splitlines() if re.match(r"^\s+\d+-\d+\s*\|", line)]
    assert sum(int(line.split()[-1]) for line in bars) == len(train)
    assert out.count("--- train example") == 2 and "[[" in out and GREEN not in out


def test_colour_on_request_and_errors(stories, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in wikisql_texts(10)])
    result = run("--model", stories, "--data", path, "-n", "1", "--color")
    assert (
        result.exit_code == 0
        and GREEN in result.stdout
        and RESET in result.stdout
        and "[[" not in result.stdout
    )
    result = run("--data", path)
    assert result.exit_code == 2 and "no model" in result.stderr
    result = run("--model", stories, "--data", path, "--split", "test")
    assert result.exit_code == 2 and "no test split (there are: train, valid)" in result.stderr
    assert json.loads(json.dumps(result.stderr))  # one plain line, no traceback
    assert "Traceback" not in result.output


def test_preference_pairs_preview_marks_each_answer(stories, tmp_path):
    """`mlxft data --train-mode dpo`: per pair, both sides as the model sees them, and only the
    answers trained; the counts are the preference loader's own."""
    from mlxft.data.preference import load_preference_splits

    pairs = [
        {"prompt": f"Q: how many {w}?\nA:", "chosen": f" SELECT COUNT {w}", "rejected": " Once"}
        for w in ("cats", "dogs", "trees", "birds")
    ]
    data = tmp_path / "pairs"
    write_jsonl(data / "train.jsonl", pairs)
    write_jsonl(data / "valid.jsonl", pairs[:1])
    result = run("--model", stories, "--data", data, "--train-mode", "dpo", "-n", "2")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Data train: 4 pairs, format preference" in out
    for i in (1, 2):
        for side in ("chosen", "rejected"):
            block = out.split(f"--- train pair {i}, {side}:")[1].split("\n", 1)[1]
            block = block.split("\n--- ")[0]
            marked = re.findall(r"\[\[(.*?)\]\]", block, flags=re.S)
            assert len(marked) == 1
            answer = marked[0].removesuffix("</s>").strip()
            assert answer in {p[side].strip() for p in pairs}
            assert block.startswith("<s> Q: how many")
    cfg = build_config(overrides={"model": str(stories), "data": str(data), "train_mode": "dpo"})
    train = load_preference_splits(cfg, load_tokenizer(stories, cfg))["train"]
    chosen_trained = sum(int(m.sum()) for m in train.chosen_masks)
    assert f"chosen: tokens {sum(len(c) for c in train.chosen)} ({chosen_trained} trained" in out
    plain = run("--model", stories, "--data", data)
    assert plain.exit_code == 2 and "--train-mode dpo" in plain.output
