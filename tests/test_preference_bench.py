"""The DPO benchmark's anchor (mlx-lm-lora, benchmarks/mlx_lm_lora_run.py) trains on exactly our
pair batches: same pairs per step, same order, same answer-token counts (the rate's numerator)."""

from __future__ import annotations

import json
import sys

import numpy as np

from mlxft.config import build_config
from mlxft.data.preference import load_preference_splits, pair_epoch_batches
from mlxft.hub import load_tokenizer
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import mlx_lm_lora_run  # noqa: E402


def test_mlx_lm_lora_gets_our_pair_batches(stories, tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    lines = (REPO / "examples" / "data" / "wikisql_dpo" / "train.jsonl").read_text().splitlines()
    (data / "train.jsonl").write_text("\n".join(lines[:10]) + "\n")
    (data / "valid.jsonl").write_text(lines[10] + "\n")
    args = [
        "--model",
        str(stories),
        "--data",
        str(data),
        "--batch-size",
        "4",
        "--max-seq-length",
        "512",
    ]
    cfg = build_config(
        overrides={
            "model": str(stories),
            "data": str(data),
            "train_mode": "dpo",
            "max_seq_length": 512,
        }
    )
    split = load_preference_splits(cfg, load_tokenizer(stories, cfg))["train"]
    ours = pair_epoch_batches(split, 4, seed=0, epoch=0, pad_id=0) + pair_epoch_batches(
        split, 4, seed=0, epoch=1, pad_id=0
    )
    theirs = mlx_lm_lora_run.our_batches(args)
    for batch in ours:  # two epochs: the iterator runs on
        chosen, rejected, chosen_mask, rejected_mask = (np.array(a) for a in next(theirs))
        half = batch.size
        for row in range(half):
            n = batch.lengths[row]
            assert list(chosen[row, :n]) == list(batch.inputs[row, : n - 1]) + [
                batch.targets[row, n - 2]
            ]
        # mlx-lm-lora scores targets where mask[:, 1:] is set: exactly our answer positions
        assert np.array_equal(chosen_mask[:, 1:], batch.mask[:half, : chosen_mask.shape[1] - 1])
        assert np.array_equal(rejected_mask[:, 1:], batch.mask[half:, : rejected_mask.shape[1] - 1])
        assert chosen_mask[:, 1:].sum() + rejected_mask[:, 1:].sum() == batch.ntokens
    assert json.loads(lines[0])["chosen"].startswith(" SELECT")
