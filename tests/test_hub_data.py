"""Data through the `datasets` library: hub ids from the offline cache, mlx-lm's hf_dataset block,
Parquet, CSV, JSON via datasets and save_to_disk directories; ShareGPT records.  Every source must
tokenize to exactly what the same rows give as a plain .jsonl file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mlxft.config import build_config
from mlxft.data import load_splits
from mlxft.errors import UserError
from tests.conftest import REPO, STORIES
from tests.datasets_cache import cache_hub_dataset
from tests.test_data import CONVO, chatml_tok, plain_tok, stories_tok, write_jsonl  # noqa: F401  (fixtures)

datasets = pytest.importorskip("datasets")

QA = [{"question": f"What is {i} plus {i}?", "answer": f"{2 * i}", "extra": i} for i in range(12)]
COMPLETIONS = [{"prompt": r["question"], "completion": r["answer"]} for r in QA]


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty datasets cache that load_dataset reads (HF_HUB_OFFLINE=1 is set by conftest)."""
    cache = tmp_path / "hf_datasets_cache"
    cache.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    assert datasets.config.HF_HUB_OFFLINE, "these tests exercise the offline hub path"
    return cache


def cfg_of(**values):
    values.setdefault("mask_prompt", True)
    return build_config(overrides=values)


def same(a, b) -> None:
    """Two splits hold identical token ids and target masks, in order."""
    assert len(a.sequences) == len(b.sequences)
    for x, y, mx, my in zip(a.sequences, b.sequences, a.masks, b.masks):
        assert list(x) == list(y) and list(mx) == list(my)


def reference_splits(tmp_path, rows_by_split, tok, **cfg):
    folder = tmp_path / "reference"
    for name, rows in rows_by_split.items():
        write_jsonl(folder / f"{name}.jsonl", rows)
    return load_splits(cfg_of(data=str(folder), **cfg), tok)


# --------------------------------------------------------------------------- hub ids
def test_hub_id_from_the_offline_cache_equals_jsonl(hub_cache, tmp_path, stories_tok):
    cache_hub_dataset(
        hub_cache,
        "someorg/tiny_qa",
        {"train": COMPLETIONS[:10], "validation": COMPLETIONS[10:], "test": COMPLETIONS[:3]},
    )
    splits = load_splits(cfg_of(data="someorg/tiny_qa"), stories_tok)
    assert set(splits) == {"train", "valid", "test"}
    assert (
        splits["train"].source == "someorg/tiny_qa[train]"
        and splits["valid"].source == "someorg/tiny_qa[validation]"
    )
    ref = reference_splits(
        tmp_path,
        {"train": COMPLETIONS[:10], "valid": COMPLETIONS[10:], "test": COMPLETIONS[:3]},
        stories_tok,
    )
    for name in ("train", "valid", "test"):
        same(splits[name], ref[name])
        assert splits[name].format == "completion"


def test_hub_id_without_validation_split_is_carved_like_one_file(hub_cache, tmp_path, stories_tok):
    cache_hub_dataset(hub_cache, "someorg/only_train", {"train": COMPLETIONS})
    splits = load_splits(cfg_of(data="someorg/only_train"), stories_tok)
    one_file = load_splits(
        cfg_of(data=str(write_jsonl(tmp_path / "all.jsonl", COMPLETIONS))), stories_tok
    )
    same(splits["train"], one_file["train"])
    same(splits["valid"], one_file["valid"])


def test_hf_dataset_block_splits_and_features_as_mlx_lm(hub_cache, tmp_path, stories_tok):
    """mlx-lm's shape: path, name (config), train/valid/test splits (sliced), *_feature renames."""
    cache_hub_dataset(hub_cache, "someorg/tiny_qa", {"train": QA}, config="plain")
    block = {
        "path": "someorg/tiny_qa",
        "name": "plain",
        "train_split": "train[:8]",
        "valid_split": "train[8:10]",
        "test_split": "train[-2:]",
        "prompt_feature": "question",
        "completion_feature": "answer",
    }
    splits = load_splits(cfg_of(hf_dataset=block), stories_tok)
    ref = reference_splits(
        tmp_path,
        {"train": COMPLETIONS[:8], "valid": COMPLETIONS[8:10], "test": COMPLETIONS[-2:]},
        stories_tok,
    )
    for name in ("train", "valid", "test"):
        same(splits[name], ref[name])
    assert splits["train"].source == "someorg/tiny_qa[train[:8]]"


def test_hf_dataset_defaults_are_mlx_lms_and_a_list_concatenates(hub_cache, tmp_path, stories_tok):
    cache_hub_dataset(hub_cache, "someorg/tiny_qa", {"train": QA})
    texts = [{"body": f"story number {i}"} for i in range(10)]
    cache_hub_dataset(hub_cache, "someorg/stories", {"train": texts})
    blocks = [
        {"path": "someorg/tiny_qa", "prompt_feature": "question", "completion_feature": "answer"},
        {"path": "someorg/stories", "text_feature": "body"},
    ]
    splits = load_splits(cfg_of(hf_dataset=blocks, mask_prompt=False), stories_tok)
    # mlx-lm's defaults: train[:80%] to train on, train[-10%:] to validate
    qa = reference_splits(
        tmp_path / "qa",
        {"train": COMPLETIONS[:10], "valid": COMPLETIONS[-1:]},
        stories_tok,
        mask_prompt=False,
    )
    st = reference_splits(
        tmp_path / "st",
        {"train": [{"text": t["body"]} for t in texts[:8]], "valid": [{"text": texts[-1]["body"]}]},
        stories_tok,
        mask_prompt=False,
    )
    assert splits["train"].format == "completion+text"
    assert [list(s) for s in splits["train"].sequences] == [
        list(s) for s in qa["train"].sequences + st["train"].sequences
    ]
    assert [list(s) for s in splits["valid"].sequences] == [
        list(s) for s in qa["valid"].sequences + st["valid"].sequences
    ]


def test_hub_errors_are_one_line(hub_cache, stories_tok):
    cache_hub_dataset(hub_cache, "someorg/tiny_qa", {"train": QA})
    with pytest.raises(
        UserError,
        match=r"someorg/nothing: no such local path, and not a dataset in the Hugging "
        r"Face datasets cache while HF_HUB_OFFLINE=1",
    ):
        load_splits(cfg_of(data="someorg/nothing"), stories_tok)
    with pytest.raises(
        UserError,
        match=r"someorg/tiny_qa: unknown split 'valid' \(Unknown split \"valid\". "
        r"Should be one of \['train'\]",
    ):
        load_splits(
            cfg_of(hf_dataset={"path": "someorg/tiny_qa", "valid_split": "valid"}), stories_tok
        )
    with pytest.raises(
        UserError,
        match=r"someorg/tiny_qa\[train\[:80%\]\]: no column 'query' "
        r"\(hf_dataset.prompt_feature\); the columns are question, answer, extra",
    ):
        load_splits(
            cfg_of(hf_dataset={"path": "someorg/tiny_qa", "prompt_feature": "query"}), stories_tok
        )
    with pytest.raises(
        UserError, match=r"someorg/tiny_qa\[train\[:80%\]\]\[0\]: record matches no data format"
    ):
        load_splits(cfg_of(hf_dataset={"path": "someorg/tiny_qa"}), stories_tok)
    with pytest.raises(UserError, match=r"unknown key 'hf_dataset.feature', did you mean"):
        cfg_of(hf_dataset={"path": "a/b", "feature": "x"})
    with pytest.raises(UserError, match=r"config 'other' is not in the local datasets cache"):
        load_splits(cfg_of(hf_dataset={"path": "someorg/tiny_qa", "name": "other"}), stories_tok)


def test_cli_reads_a_hub_id_in_a_fresh_process_and_jsonl_never_imports_datasets(tmp_path):
    """The real environment path: HF_DATASETS_CACHE + HF_HUB_OFFLINE=1 in a new process; the same
    process first loads .jsonl data and checks `datasets` was not imported for it."""
    cache = tmp_path / "cache"
    cache_hub_dataset(
        cache, "someorg/tiny_qa", {"train": COMPLETIONS[:10], "validation": COMPLETIONS[10:]}
    )
    data = tmp_path / "jsonl"
    write_jsonl(data / "train.jsonl", COMPLETIONS[:10])
    write_jsonl(data / "valid.jsonl", COMPLETIONS[10:])
    script = f"""
import sys
from mlxft.config import build_config
from mlxft.data import load_splits
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(STORIES)!r})
plain = load_splits(build_config(overrides={{"data": {str(data)!r}}}), tok)
assert "datasets" not in sys.modules, "the .jsonl path imported datasets"
hub = load_splits(build_config(overrides={{"data": "someorg/tiny_qa"}}), tok)
assert "datasets" in sys.modules
for name in ("train", "valid"):
    assert [list(s) for s in plain[name].sequences] == [list(s) for s in hub[name].sequences], name
print("ok", len(hub["train"]), hub["valid"].source)
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(cache))
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ok", "10", "someorg/tiny_qa[validation]"]


# --------------------------------------------------------------------------- local files
def test_parquet_csv_json_and_save_to_disk_equal_jsonl(tmp_path, stories_tok):
    rows = COMPLETIONS
    ref = load_splits(cfg_of(data=str(write_jsonl(tmp_path / "rows.jsonl", rows))), stories_tok)
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "rows.parquet"))
    table.to_csv(str(tmp_path / "rows.csv"), index=False)
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    table.save_to_disk(str(tmp_path / "saved_one"))
    for source in ("rows.parquet", "rows.csv", "rows.json", "saved_one"):
        got = load_splits(cfg_of(data=str(tmp_path / source)), stories_tok)
        same(got["train"], ref["train"])
        same(got["valid"], ref["valid"])
    where = load_splits(cfg_of(data=str(tmp_path / "rows.csv")), stories_tok)["train"].source
    assert where.endswith("rows.csv")


def test_save_to_disk_dataset_dict_and_a_directory_of_tables(tmp_path, stories_tok):
    ref = reference_splits(
        tmp_path, {"train": COMPLETIONS[:10], "valid": COMPLETIONS[10:]}, stories_tok
    )
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(COMPLETIONS[:10]),
            "validation": datasets.Dataset.from_list(COMPLETIONS[10:]),
        }
    )
    dd.save_to_disk(str(tmp_path / "saved_dict"))
    folder = tmp_path / "tables"
    folder.mkdir()
    datasets.Dataset.from_list(COMPLETIONS[:10]).to_parquet(str(folder / "train.parquet"))
    datasets.Dataset.from_list(COMPLETIONS[10:]).to_csv(str(folder / "valid.csv"), index=False)
    for source in ("saved_dict", "tables"):
        got = load_splits(cfg_of(data=str(tmp_path / source)), stories_tok)
        same(got["train"], ref["train"])
        same(got["valid"], ref["valid"])
    (folder / "train.jsonl").write_text(json.dumps(COMPLETIONS[0]) + "\n")
    with pytest.raises(
        UserError, match=r"tables: both train.jsonl and train.parquet exist; keep one"
    ):
        load_splits(cfg_of(data=str(folder)), stories_tok)


def test_table_errors_name_the_row(tmp_path, stories_tok):
    datasets.Dataset.from_list(
        [{"text": "fine"}, {"text": "also fine"}, {"text": None}]
    ).to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(UserError, match=r"t.parquet\[2\]: 'text' must be a string, got None"):
        load_splits(cfg_of(data=str(tmp_path / "t.parquet"), mask_prompt=False), stories_tok)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match=r"bad.parquet: cannot read this parquet file"):
        load_splits(cfg_of(data=str(tmp_path / "bad.parquet")), stories_tok)


# --------------------------------------------------------------------------- ShareGPT
SHAREGPT = {
    "system": "be brief",
    "conversations": [
        {"from": "human", "value": "hi"},
        {"from": "gpt", "value": "yo"},
        {"from": "human", "value": "what?"},
        {"from": "gpt", "value": "SELECT 1"},
    ],
}


@pytest.mark.filterwarnings("ignore:the tokenizer has no chat template")
@pytest.mark.parametrize("tok_name", ["chatml_tok", "plain_tok"])
def test_sharegpt_masks_like_the_same_messages(tmp_path, tok_name, request):
    """Masked per assistant turn, token for token as the `messages` record of the same conversation
    (ChatML template, and the plain role: content fallback)."""
    tok = request.getfixturevalue(tok_name)
    sharegpt = load_splits(cfg_of(data=str(write_jsonl(tmp_path / "s.jsonl", [SHAREGPT] * 3))), tok)
    messages = load_splits(
        cfg_of(data=str(write_jsonl(tmp_path / "m.jsonl", [{"messages": CONVO}] * 3))), tok
    )
    assert sharegpt["train"].format == "sharegpt"
    same(sharegpt["train"], messages["train"])
    ids, mask = sharegpt["train"].sequences[0], sharegpt["train"].masks[0]
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    assert (
        "yo" in trained
        and "SELECT 1" in trained
        and "what?" not in trained
        and "be brief" not in trained
    )


def test_sharegpt_errors(tmp_path, chatml_tok):
    bad_role = dict(
        SHAREGPT, conversations=[{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]
    )
    path = write_jsonl(tmp_path / "d" / "train.jsonl", [SHAREGPT, bad_role])
    write_jsonl(tmp_path / "d" / "valid.jsonl", [SHAREGPT])
    with pytest.raises(
        UserError,
        match=r"d/train.jsonl:2: ShareGPT role 'bot' \(conversations item 1\) is not "
        r"known; use one of human, user, gpt, assistant, chatgpt, system",
    ):
        load_splits(cfg_of(data=str(path.parent)), chatml_tok)
    both = {
        "system": "x",
        "conversations": [{"from": "system", "value": "y"}, {"from": "human", "value": "q"}],
    }
    write_jsonl(tmp_path / "d" / "train.jsonl", [SHAREGPT, both])
    with pytest.raises(UserError, match=r"train.jsonl:2: both a 'system' field and a system turn"):
        load_splits(cfg_of(data=str(path.parent)), chatml_tok)
    write_jsonl(tmp_path / "d" / "train.jsonl", [SHAREGPT, {"conversations": [{"from": "human"}]}])
    with pytest.raises(UserError, match=r"train.jsonl:2: 'conversations' must be a list of"):
        load_splits(cfg_of(data=str(path.parent)), chatml_tok)


def test_hf_chat_feature_of_sharegpt_turns(hub_cache, tmp_path, chatml_tok):
    rows = [{"dialog": SHAREGPT["conversations"], "system": "be brief"}] * 10
    cache_hub_dataset(hub_cache, "someorg/talk", {"train": rows})
    splits = load_splits(
        cfg_of(hf_dataset={"path": "someorg/talk", "chat_feature": "dialog"}), chatml_tok
    )
    assert splits["train"].format == "sharegpt"
    ref = load_splits(
        cfg_of(data=str(write_jsonl(tmp_path / "m.jsonl", [{"messages": CONVO}] * 2))), chatml_tok
    )
    assert list(splits["train"].masks[0]) == list(ref["train"].masks[0])
    assert np.array_equal(splits["train"].sequences[0], ref["train"].sequences[0])


def test_a_missing_extra_is_one_line_naming_it(tmp_path, stories_tok, monkeypatch):
    from mlxft.inference.scores import score

    datasets.Dataset.from_list(COMPLETIONS).to_parquet(str(tmp_path / "rows.parquet"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(
        UserError, match=r"need the datasets library: pip install 'mlxft\[datasets\]'"
    ):
        load_splits(cfg_of(data=str(tmp_path / "rows.parquet")), stories_tok)
    with pytest.raises(
        UserError,
        match=r"^some/typo: data path not found; as a hub dataset id it needs the "
        r"datasets library: pip install 'mlxft\[datasets\]'$",
    ):
        load_splits(cfg_of(data="some/typo"), stories_tok)
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    with pytest.raises(UserError, match=r"pip install 'mlxft\[eval\]'"):
        score(["a"], ["a"])
