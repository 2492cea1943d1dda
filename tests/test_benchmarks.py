"""The benchmark's PEFT anchor trains on exactly our batches (benchmarks/peft_run.py), so a
ratio compares the same work: same rows per step, same order, same trained-token counts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from mlxft.data import epoch_batches, load_splits, pad_token_id  # noqa: E402
from mlxft.train import load_tokenizer  # noqa: E402
from tests.session_helpers import make_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peft_run  # noqa: E402


def test_peft_anchor_batches_are_ours(stories, wikisql_small, tmp_path):
    cfg = make_config(stories, wikisql_small, tmp_path / "out", batch_size=3, max_seq_length=512)
    tokenizer = load_tokenizer(stories, cfg)
    ours = epoch_batches(load_splits(cfg, tokenizer)["train"], 3, seed=0, epoch=0, pad_id=pad_token_id(tokenizer))
    rows, masked = peft_run.load_rows(wikisql_small, tokenizer, 512)
    theirs = peft_run.batch_order(rows, 3, seed=0, steps=len(ours) + 5)  # runs on into a second epoch
    assert min(len(b.lengths) for b in ours) == 1  # 64 rows in 3s: the short chunk is a step of its own
    for batch, chunk in zip(ours, theirs):
        collated = peft_run.collate([rows[i] for i in chunk], 0, [masked[i] for i in chunk])
        assert sorted(batch.lengths.tolist()) == sorted(len(rows[i]) for i in chunk)
        assert peft_run.trained_tokens(collated) == batch.ntokens
    second = epoch_batches(load_splits(cfg, tokenizer)["train"], 3, seed=0, epoch=1, pad_id=pad_token_id(tokenizer))
    assert [sorted(b.lengths.tolist()) for b in second[:5]] == [sorted(len(rows[i]) for i in c) for c in theirs[len(ours):]]
