"""Short training runs through the real `Session`, shared by the QLoRA / DoRA / full tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlxft.config import build_config
from mlxft.training.session import Session


def make_config(model: Path, data: Path, out: Path, **overrides):
    """A small fast config: 2-sequence batches of <= 64 tokens, one validation batch, rank 4."""
    lora = {"rank": overrides.pop("rank", 4), "dropout": overrides.pop("dropout", 0.0)}
    values = dict(
        model=str(model),
        data=str(data),
        adapter_path=str(out),
        train=True,
        iters=6,
        batch_size=2,
        max_seq_length=64,
        learning_rate=1e-2,
        num_layers=-1,
        steps_per_eval=1000,
        steps_per_report=1,
        val_batches=1,
        save_every=1000,
        seed=0,
    )
    values.update(overrides)
    return build_config(overrides=values, lora_overrides=lora)


def train(model: Path, data: Path, out: Path, **overrides) -> Session:
    session = Session(make_config(model, data, out, **overrides), reporter_quiet=True)
    session.train()
    return session


def train_losses(out: Path) -> list:
    """Per-step training losses from the run's metrics.jsonl (steps_per_report = 1)."""
    import json

    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


def token_ids(vocab: int, shape=(2, 12), seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, vocab, size=shape).astype(np.int64)
