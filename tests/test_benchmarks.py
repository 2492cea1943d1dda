"""The benchmark's anchors train on exactly our batches (benchmarks/peft_run.py for PEFT,
benchmarks/mlx_lm_run.py for mlx_lm), so a ratio compares the same work: same rows per step, same
order, same trained-token counts, and peak memory follows the same largest batch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from mlxft.data import epoch_batches, load_splits, pad_token_id  # noqa: E402
from mlxft.hub import load_tokenizer  # noqa: E402
from tests.session_helpers import make_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peft_run  # noqa: E402


def test_peft_anchor_batches_are_ours(stories, wikisql_small, tmp_path):
    cfg = make_config(stories, wikisql_small, tmp_path / "out", batch_size=3, max_seq_length=512)
    tokenizer = load_tokenizer(stories, cfg)
    ours = epoch_batches(
        load_splits(cfg, tokenizer)["train"], 3, seed=0, epoch=0, pad_id=pad_token_id(tokenizer)
    )
    rows, masked = peft_run.load_rows(wikisql_small, tokenizer, 512)
    theirs = peft_run.batch_order(
        rows, 3, seed=0, steps=len(ours) + 5
    )  # runs on into a second epoch
    assert (
        min(len(b.lengths) for b in ours) == 1
    )  # 64 rows in 3s: the short chunk is a step of its own
    for batch, chunk in zip(ours, theirs):
        collated = peft_run.collate([rows[i] for i in chunk], 0, [masked[i] for i in chunk])
        assert sorted(batch.lengths.tolist()) == sorted(len(rows[i]) for i in chunk)
        assert peft_run.trained_tokens(collated) == batch.ntokens
    second = epoch_batches(
        load_splits(cfg, tokenizer)["train"], 3, seed=0, epoch=1, pad_id=pad_token_id(tokenizer)
    )
    assert [sorted(b.lengths.tolist()) for b in second[:5]] == [
        sorted(len(rows[i]) for i in c) for c in theirs[len(ours) :]
    ]


def test_mlx_lm_anchor_batches_are_ours(stories, wikisql_small, tmp_path):
    """mlx_lm's train loop gets our batches, in our order, collated by its own iterate_batches;
    its validation set keeps mlx_lm's own batching."""
    import mlx_lm_run

    cfg = make_config(stories, wikisql_small, tmp_path / "out", batch_size=3, max_seq_length=512)
    tokenizer = load_tokenizer(stories, cfg)
    ours = epoch_batches(
        load_splits(cfg, tokenizer)["train"], 3, seed=0, epoch=0, pad_id=pad_token_id(tokenizer)
    )
    rows, _ = peft_run.load_rows(wikisql_small, tokenizer, 512)
    iterate = mlx_lm_run.our_batches(
        [
            "--model",
            str(stories),
            "--data",
            str(wikisql_small),
            "--batch-size",
            "3",
            "--max-seq-length",
            "512",
            "--seed",
            "0",
            "--iters",
            str(len(ours)),
        ]
    )
    train = [(row, 0) for row in rows]  # what mlx_lm's CacheDataset hands out: (tokens, offset)
    seen = list(iterate(train, 3, 512, loop=True))
    assert len(seen) == len(ours)
    for batch, (tokens, lengths) in zip(ours, seen):
        assert sorted(lengths[:, 1].tolist()) == sorted(batch.lengths.tolist())
        for row, length in zip(tokens.tolist(), lengths[:, 1].tolist()):
            assert row[:length] in [list(r) for r in rows]  # whole rows, unchanged
    valid = list(iterate(train[:7], 3, 512))  # another set: mlx_lm's own batches (full ones only)
    assert len(valid) == 2


def test_a_measured_child_does_not_inherit_the_callers_peak(tmp_path):
    """Linux starts a child's ru_maxrss at its parent's peak; the launcher in benchmarks.common
    keeps this (large) process's peak out of every figure it reports, and passes the status on."""
    import os

    from benchmarks.common import measure

    ballast = bytearray(800 * 2**20)  # this process's peak is now at least 800 MB
    ballast[::4096] = b"x" * len(ballast[::4096])
    del ballast
    with open(tmp_path / "out", "w") as out:
        small = measure([sys.executable, "-c", "pass"], out, out, dict(os.environ))
        grown = measure(
            [sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"],
            out,
            out,
            dict(os.environ),
        )
        failed = measure([sys.executable, "-c", "raise SystemExit(3)"], out, out, dict(os.environ))
    assert small.status == 0 and small.peak_bytes < 100e6, small
    assert grown.status == 0 and 300e6 < grown.peak_bytes < 450e6, grown
    assert failed.status == 3
