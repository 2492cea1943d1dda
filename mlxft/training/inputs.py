"""What a run reads before any weights load: where it writes, which checkpoint it resumes,
the model directory, the tokenizer and the tokenized splits.

Shared by training (`Session`) and `mlxft lora --dry-run` (`planner.dry_run`), so both check
and read their inputs the same way, and every check that can fail does so before a slow load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlxft.config import Config
from mlxft.data import load_splits, pad_token_id
from mlxft.data.preference import load_preference_splits
from mlxft.fileio import check_destination
from mlxft.hub import load_tokenizer, resolve_model
from mlxft.training.checkpoint import find_checkpoint
from mlxft.training.run_dir import check_unlocked


@dataclass
class Inputs:
    model_path: Path
    tokenizer: object
    splits: dict  # name -> mlxft.data.Split (PreferenceSplit for dpo/orpo)
    pad_id: int
    checkpoint: Path | None  # the checkpoint `--resume`/`--resume-from` continues, if any


def read_inputs(cfg: Config, writes: bool = True) -> Inputs:
    """`writes`: this process writes adapter_path (every rank but rank 0 of a data-parallel run
    leaves it alone, and on another machine need not be able to)."""
    if cfg.train and writes:
        check_destination(Path(cfg.adapter_path), "adapter_path", empty=False)
        check_unlocked(Path(cfg.adapter_path))
    checkpoint = find_checkpoint(cfg) if cfg.train else None
    model_path = resolve_model(cfg.model, cfg.revision)
    tokenizer = load_tokenizer(model_path, cfg)
    if cfg.train_mode == "sft":
        splits = load_splits(cfg, tokenizer)
    else:  # dpo / orpo: {"prompt", "chosen", "rejected"} pairs
        splits = load_preference_splits(cfg, tokenizer)
    return Inputs(model_path, tokenizer, splits, pad_token_id(tokenizer), checkpoint)
