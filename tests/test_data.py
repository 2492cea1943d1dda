"""Data pipeline: formats → exact target masks, truncation, splits, length-sorted batches."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from mlxft.config import Config
from mlxft.data import (
    Batch,
    Split,
    epoch_batches,
    eval_batches,
    load_splits,
    make_batch,
    pad_token_id,
    padding_fraction,
)
from mlxft.errors import UserError
from tests.conftest import STORIES, WIKISQL
from tests.tiny_models import CHATML, build_tokenizer

CONVO = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "what?"},
    {"role": "assistant", "content": "SELECT 1"},
]


@pytest.fixture(scope="session")
def stories_tok():
    """Real base tokenizer: sentencepiece Llama, BOS=1 EOS=2, no pad, no chat template."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(STORIES)


@pytest.fixture(scope="session")
def chatml_tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("chatml_tok"))


@pytest.fixture(scope="session")
def plain_tok(tmp_path_factory):
    """The tiny BPE tokenizer without a chat template."""
    return build_tokenizer(tmp_path_factory.mktemp("plain_tok"), chat_template=None)


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def wikisql_texts(n=None) -> list[str]:
    lines = (WIKISQL / "train.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines[:n]]


def load(tmp_path, rows, tok, name="data.jsonl", **cfg):
    """Write `rows` to one jsonl file and load it (train/valid carved by valid_split)."""
    path = write_jsonl(tmp_path / name, rows)
    return load_splits(Config(data=str(path), **cfg), tok)


def target_spans(tok, seq, mask) -> list[str]:
    """Decoded runs of consecutive target tokens."""
    spans, current = [], []
    for token, m in zip(seq.tolist(), mask.tolist()):
        if m:
            current.append(token)
        elif current:
            spans.append(tok.decode(current))
            current = []
    if current:
        spans.append(tok.decode(current))
    return spans


def all_examples(splits):
    return [(s, m) for split in splits.values() for s, m in zip(split.sequences, split.masks)]


# ----------------------------------------------------------------------------- formats


def test_text_format_wikisql_dir(wikisql_small, stories_tok):
    splits = load_splits(Config(data=str(wikisql_small)), stories_tok)
    assert set(splits) == {"train", "valid", "test"}
    assert [len(splits[k]) for k in ("train", "valid", "test")] == [64, 16, 16]
    train = splits["train"]
    assert train.format == "text" and train.truncated == 0 and train.dropped == 0
    texts = wikisql_texts(64)
    for text, seq, mask in zip(texts, train.sequences, train.masks):
        assert seq.dtype == np.int32 and mask.dtype == bool and len(seq) == len(mask)
        assert seq.tolist() == stories_tok(text)["input_ids"] + [
            2
        ]  # BOS from the tokenizer, EOS appended
        assert seq[0] == 1 and not mask[0] and mask[1:].all()


def test_text_already_ending_in_eos_gets_no_second_one(tmp_path, stories_tok):
    splits = load(tmp_path, [{"text": "Once upon a time</s>"}] * 4, stories_tok)
    seq = splits["train"].sequences[0]
    assert seq[-1] == 2 and seq[-2] != 2


@pytest.mark.parametrize("mask_prompt", [True, False])
def test_completion_plain_masks(tmp_path, stories_tok, mask_prompt):
    rows = []
    for text in wikisql_texts(12):
        prompt, completion = text.split("\nA: ")
        rows.append({"prompt": prompt + "\nA: ", "completion": completion})
    splits = load(tmp_path, rows, stories_tok, mask_prompt=mask_prompt)
    assert splits["train"].format == "completion"
    by_text = {
        stories_tok.decode(s, skip_special_tokens=True): (s, m) for s, m in all_examples(splits)
    }
    assert len(by_text) == len(rows)
    for row in rows:
        full = stories_tok(row["prompt"] + row["completion"])["input_ids"] + [2]
        seq, mask = next((s, m) for s, m in by_text.values() if s.tolist() == full)
        if mask_prompt:
            first = int(np.argmax(mask))
            assert mask[first:].all() and not mask[:first].any()  # one contiguous suffix
            assert stories_tok.decode(seq[mask]) == row["completion"] + "</s>"
        else:
            assert not mask[0] and mask[1:].all()


def test_completion_with_chat_template(tmp_path, chatml_tok):
    rows = [{"prompt": f"What is {i}?", "completion": f"It is {i}."} for i in range(6)]
    splits = load(tmp_path, rows, chatml_tok, mask_prompt=True)
    for seq, mask in all_examples(splits):
        text = chatml_tok.decode(seq)
        i = text.split("What is ")[1][0]
        assert (
            text == f"<|im_start|>user\nWhat is {i}?<|im_end|>\n"
            f"<|im_start|>assistant\nIt is {i}.<|im_end|>\n"
        )
        assert target_spans(chatml_tok, seq, mask) == [f"It is {i}.<|im_end|>\n"]


def test_use_chat_template_false_and_true(tmp_path, chatml_tok, plain_tok):
    rows = [{"prompt": "Q: one?\n", "completion": "A: two"}] * 3
    splits = load(tmp_path, rows, chatml_tok, mask_prompt=True, use_chat_template="false")
    seq, mask = splits["train"].sequences[0], splits["train"].masks[0]
    assert chatml_tok.decode(seq) == "<s>Q: one?\nA: two</s>"
    assert chatml_tok.decode(seq[mask]) == "A: two</s>"
    with pytest.raises(
        UserError, match="use_chat_template is true but the tokenizer has no chat template"
    ):
        load(tmp_path, rows, plain_tok, use_chat_template="true")


def test_multi_turn_chat_masks_every_assistant_turn(tmp_path, chatml_tok):
    splits = load(
        tmp_path, [{"messages": CONVO, "tools": [{"name": "x"}]}] * 3, chatml_tok, mask_prompt=True
    )
    assert splits["train"].format == "chat"
    seq, mask = splits["train"].sequences[0], splits["train"].masks[0]
    assert chatml_tok.decode(seq) == chatml_tok.apply_chat_template(CONVO, tokenize=False)
    assert target_spans(chatml_tok, seq, mask) == ["yo<|im_end|>\n", "SELECT 1<|im_end|>\n"]
    # without mask_prompt everything after token 0 is trained
    splits = load(tmp_path, [{"messages": CONVO}] * 3, chatml_tok, mask_prompt=False)
    assert not splits["train"].masks[0][0] and splits["train"].masks[0][1:].all()


def test_alpaca_renders_as_chat(tmp_path, chatml_tok):
    rows = [
        {"instruction": "Add", "input": "1 2", "output": "3"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
    ]
    splits = load(tmp_path, rows * 2, chatml_tok, mask_prompt=True)
    assert splits["train"].format == "alpaca"
    decoded = {
        chatml_tok.decode(s): target_spans(chatml_tok, s, m) for s, m in all_examples(splits)
    }
    assert decoded == {
        "<|im_start|>user\nAdd\n\n1 2<|im_end|>\n<|im_start|>assistant\n3<|im_end|>\n": [
            "3<|im_end|>\n"
        ],
        "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n": [
            "hi<|im_end|>\n"
        ],
    }


def test_fallback_template_when_tokenizer_has_none_warns_once(tmp_path, plain_tok):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load(tmp_path, [{"messages": CONVO}] * 10, plain_tok, mask_prompt=True)
    notes = [str(w.message) for w in caught if "no chat template" in str(w.message)]
    assert len(notes) == 1 and "chat_template" in notes[0]
    seq, mask = splits["train"].sequences[0], splits["train"].masks[0]
    assert plain_tok.decode(seq) == (
        "<s>system: be brief\nuser: hi\nassistant: yo</s>\nuser: what?\nassistant: SELECT 1</s>"
    )
    # byte-level BPE merges the header's trailing space into " SELECT": that token is a target
    assert [t.strip() for t in target_spans(plain_tok, seq, mask)] == ["yo</s>", "SELECT 1</s>"]


def test_fallback_on_real_base_tokenizer(tmp_path, stories_tok):
    with pytest.warns(UserWarning, match="no chat template"):
        splits = load(tmp_path, [{"messages": CONVO}] * 3, stories_tok, mask_prompt=True)
    seq, mask = splits["train"].sequences[0], splits["train"].masks[0]
    assert seq[0] == 1 and [stories_tok.decode(s).strip() for s in [seq[mask]]] == [
        "yo</s> SELECT 1</s>"
    ]
    assert (seq[mask] == 2).sum() == 2  # an EOS closes each assistant turn


def test_chat_template_override_string_and_file(tmp_path, plain_tok):
    path = tmp_path / "chatml.jinja"
    path.write_text(CHATML)
    for template in (CHATML, str(path)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback notice
            splits = load(
                tmp_path,
                [{"messages": CONVO}] * 3,
                plain_tok,
                mask_prompt=True,
                chat_template=template,
            )
        seq, mask = splits["train"].sequences[0], splits["train"].masks[0]
        assert target_spans(plain_tok, seq, mask) == ["yo<|im_end|>\n", "SELECT 1<|im_end|>\n"]
    with pytest.raises(UserError, match="chat_template: file .*missing.jinja not found"):
        load(
            tmp_path,
            [{"messages": CONVO}] * 3,
            plain_tok,
            chat_template=str(tmp_path / "missing.jinja"),
        )


def test_prompt_completion_templates(tmp_path, stories_tok):
    rows = [
        {
            "Question": f"Is {i} even?",
            "Complex_CoT": f"{i} mod 2",
            "Response": "yes" if i % 2 == 0 else "no",
        }
        for i in range(8)
    ]
    cfg = dict(
        prompt_template="Question: {Question}\n",
        completion_template="<think>\n{Complex_CoT}\n</think>\n{Response}",
        mask_prompt=True,
    )
    splits = load(tmp_path, rows, stories_tok, **cfg)
    assert splits["train"].format == "template"
    for seq, mask in all_examples(splits):
        i = int(stories_tok.decode(seq, skip_special_tokens=True).split("Is ")[1].split()[0])
        assert seq[0] == 1 and not mask[:3].any()
        assert (
            stories_tok.decode(seq[mask])
            == f"<think>\n{i} mod 2\n</think>\n{rows[i]['Response']}</s>"
        )


# ----------------------------------------------------------------------------- truncation, splits


def test_truncation_counted(tmp_path, stories_tok):
    texts = wikisql_texts(40)
    lengths = [len(stories_tok(t)["input_ids"]) + 1 for t in texts]
    limit = int(np.median(lengths))
    splits = load(tmp_path, [{"text": t} for t in texts], stories_tok, max_seq_length=limit)
    assert sum(s.truncated for s in splits.values()) == sum(n > limit for n in lengths) > 0
    assert all(len(s) <= limit for s, _ in all_examples(splits))
    assert sorted(len(s) for s, _ in all_examples(splits)) == sorted(min(n, limit) for n in lengths)


def test_prompt_longer_than_limit_is_dropped(tmp_path, stories_tok):
    rows = [{"prompt": "a " * 50, "completion": "b"}] * 3 + [{"prompt": "a", "completion": "b"}] * 5
    splits = load(tmp_path, rows, stories_tok, mask_prompt=True, max_seq_length=20, valid_split=0.2)
    assert sum(s.dropped for s in splits.values()) == 3
    assert sum(len(s) for s in splits.values()) == 5
    assert all(m.any() for _, m in all_examples(splits))
    with pytest.raises(UserError, match="no usable train examples"):
        load(tmp_path, rows[:3], stories_tok, mask_prompt=True, max_seq_length=20)


def test_single_file_split_sizes_and_determinism(tmp_path, stories_tok):
    rows = [{"text": t} for t in wikisql_texts(20)]
    a = load(tmp_path, rows, stories_tok, valid_split=0.1, seed=3)
    assert (len(a["train"]), len(a["valid"])) == (18, 2) and "test" not in a
    everything = sorted(s.tobytes() for s, _ in all_examples(a))
    expected = sorted(
        np.array(stories_tok(r["text"])["input_ids"] + [2], np.int32).tobytes() for r in rows
    )
    assert everything == expected  # disjoint, and together all records
    b = load(tmp_path, rows, stories_tok, valid_split=0.1, seed=3)
    assert [s.tolist() for s in a["valid"].sequences] == [s.tolist() for s in b["valid"].sequences]
    valid_sets = {
        tuple(
            sorted(
                s.tobytes() for s in load(tmp_path, rows, stories_tok, seed=k)["valid"].sequences
            )
        )
        for k in range(4)
    }
    assert len(valid_sets) > 1  # the seed picks the validation records
    three = load(tmp_path, rows[:3], stories_tok, valid_split=0.1)
    assert (len(three["train"]), len(three["valid"])) == (2, 1)


def test_dir_without_valid_carves_it_and_keeps_test(tmp_path, stories_tok):
    rows = [{"text": t} for t in wikisql_texts(30)]
    write_jsonl(tmp_path / "d" / "train.jsonl", rows[:20])
    write_jsonl(tmp_path / "d" / "test.jsonl", rows[20:])
    splits = load_splits(Config(data=str(tmp_path / "d"), valid_split=0.25), stories_tok)
    assert (len(splits["train"]), len(splits["valid"]), len(splits["test"])) == (15, 5, 10)


def test_json_array_and_mislabelled_jsonl(tmp_path, stories_tok):
    rows = [{"text": t} for t in wikisql_texts(10)]
    (tmp_path / "arr.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = load_splits(Config(data=str(tmp_path / "arr.json")), stories_tok)
    b = load_splits(Config(data=str(tmp_path / "lines.json")), stories_tok)
    assert sum(map(len, a.values())) == sum(map(len, b.values())) == 10
    d = tmp_path / "dir"
    d.mkdir()
    (d / "train.json").write_text(json.dumps(rows))
    (d / "valid.json").write_text(json.dumps(rows[:2]))
    assert len(load_splits(Config(data=str(d)), stories_tok)["valid"]) == 2


def test_mlx_lm_tokenizer_wrapper_is_accepted(tmp_path, stories_tok):
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    rows = [{"text": t} for t in wikisql_texts(6)]
    wrapped = load(tmp_path, rows, TokenizerWrapper(stories_tok))
    plain = load(tmp_path, rows, stories_tok)
    assert [s.tolist() for s, _ in all_examples(wrapped)] == [
        s.tolist() for s, _ in all_examples(plain)
    ]
    assert pad_token_id(TokenizerWrapper(stories_tok)) == 2


# ----------------------------------------------------------------------------- batching


@pytest.fixture(scope="module")
def wikisql_train(stories_tok):
    return load_splits(Config(data=str(WIKISQL)), stories_tok)["train"]


def test_sorted_batches_pad_less_than_unsorted(wikisql_train):
    batches = epoch_batches(wikisql_train, 8, seed=0, epoch=0, pad_id=2)
    unsorted = [
        make_batch(wikisql_train.sequences[i : i + 8], wikisql_train.masks[i : i + 8], 2)
        for i in range(0, len(wikisql_train), 8)
    ]
    assert padding_fraction(batches) < padding_fraction(unsorted)
    assert padding_fraction(batches) < 0.5 * padding_fraction(unsorted)
    ordered = epoch_batches(wikisql_train, 8, seed=0, epoch=0, pad_id=2, shuffle=False)
    maxima = [int(b.lengths.max()) for b in ordered]
    assert maxima == sorted(maxima)
    assert sum(b.inputs.shape[0] for b in batches) == len(wikisql_train) == 1000


def test_batches_deterministic_and_epoch_reorders(wikisql_train):
    def key(batches):
        return [b.inputs.tobytes() + b.targets.tobytes() + b.mask.tobytes() for b in batches]

    a = epoch_batches(wikisql_train, 16, seed=7, epoch=1, pad_id=2)
    b = epoch_batches(wikisql_train, 16, seed=7, epoch=1, pad_id=2)
    c = epoch_batches(wikisql_train, 16, seed=7, epoch=2, pad_id=2)
    d = epoch_batches(wikisql_train, 16, seed=8, epoch=1, pad_id=2)
    assert key(a) == key(b)
    assert key(a) != key(c) and sorted(key(a)) == sorted(key(c))
    assert key(a) != key(d)
    assert len(a[-1].inputs) in range(1, 17) and len(a) == -(
        -1000 // 16
    )  # the partial batch is kept


def test_batch_shift_mask_and_padding_invariants(wikisql_train):
    split = wikisql_train
    total = sum(int(m[1:].sum()) for m in split.masks)
    batches = epoch_batches(split, 5, seed=0, epoch=0, pad_id=2)
    assert sum(b.ntokens for b in batches) == total
    for b in batches:
        assert (
            b.inputs.dtype == np.int32
            and b.targets.dtype == np.int32
            and b.mask.dtype == np.float32
        )
        assert b.inputs.shape == b.targets.shape == b.mask.shape
        assert b.inputs.shape[1] == b.lengths.max() - 1  # padded to its own longest example
        for row, n in enumerate(b.lengths):
            assert (b.inputs[row, 1 : n - 1] == b.targets[row, : n - 2]).all()
            assert (b.mask[row, n - 1 :] == 0).all()  # no padded target is trained
            assert (
                b.mask[row, n - 2] == 1 and b.targets[row, n - 2] == 2
            )  # pad == eos, real EOS still trained
            assert (b.targets[row, n - 1 :] == 2).all()


def test_eval_batches_sorted_limited_and_representative(wikisql_train):
    everything = eval_batches(wikisql_train, 10, pad_id=2)
    assert len(everything) == 100 and sum(len(b.lengths) for b in everything) == 1000
    maxima = [int(b.lengths.max()) for b in everything]
    assert maxima == sorted(maxima)
    some = eval_batches(wikisql_train, 10, pad_id=2, limit=5)
    assert len(some) == 5
    picked = [int(b.lengths.max()) for b in some]
    assert picked == sorted(picked) and picked[-1] > maxima[4]  # not only the shortest batches
    assert len(eval_batches(wikisql_train, 10, pad_id=2, limit=500)) == 100


def test_padding_fraction_exact():
    seqs = [np.array([1, 5, 6, 2], np.int32), np.array([1, 7], np.int32)]
    masks = [np.array([0, 1, 1, 1], bool), np.array([0, 1], bool)]
    b = make_batch(seqs, masks, pad_id=0)
    assert isinstance(b, Batch) and b.inputs.tolist() == [[1, 5, 6], [1, 7, 0]]
    assert b.targets.tolist() == [[5, 6, 2], [7, 0, 0]] and b.mask.tolist() == [
        [1, 1, 1],
        [1, 0, 0],
    ]
    assert b.real_tokens == 4 and b.ntokens == 4  # "7 -> pad" is a wasted position, not a real one
    assert padding_fraction([b]) == pytest.approx(2 / 6)
    split = Split("train", "x", seqs, masks, 0, "text")
    assert len(epoch_batches(split, 1, seed=0, epoch=0, pad_id=0)) == 2


def test_pad_token_id(stories_tok, chatml_tok):
    assert pad_token_id(chatml_tok) == 3
    assert stories_tok.pad_token_id is None and pad_token_id(stories_tok) == 2

    class Bare:
        pad_token_id = None
        eos_token_id = None

    assert pad_token_id(Bare()) == 0
