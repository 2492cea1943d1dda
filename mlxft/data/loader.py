"""Data path → tokenized train/valid(/test) splits.

Accepts a directory (train/valid/test .jsonl, .json, .parquet or .csv) or one file that is split
into train/valid by `valid_split`; hub datasets, `hf_dataset` blocks and `save_to_disk`
directories come through `sources.py` as the same (where, record) pairs.  The carve is a seeded
permutation of *records* (before tokenizing), so the same data + seed give the same split
whatever max_seq_length is.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxft.data.records import EXTENSIONS, check_same_format, detect_format, read_records, validate
from mlxft.data.render import Renderer, unwrap
from mlxft.data.sources import TABLE_EXTENSIONS, external, read_parts, read_table
from mlxft.data.tokenize import (
    MARGIN_TOKENS,
    char_budget,
    clip_record,
    cut_pieces,
    encode,
    longest_token_chars,
    record_size,
)
from mlxft.errors import UserError

SPLITS = ("train", "valid", "test")


@dataclass
class Split:
    name: str  # train | valid | test
    source: str  # file path, for messages
    sequences: list  # int32 token ids per example, after truncation
    masks: list  # bool per token: True where that token is a target (token 0 never)
    truncated: int  # examples cut to max_seq_length
    format: str  # text | completion | chat | sharegpt | alpaca | template ("a+b": hf_dataset list)
    dropped: int = 0  # examples left with no target token (e.g. prompt >= max_seq_length)

    def __len__(self) -> int:
        return len(self.sequences)


def pad_token_id(tokenizer) -> int:
    """Pad id, else EOS id, else 0: padding is always masked out, so any id is safe."""
    tok = unwrap(tokenizer)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tok, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _find(folder: Path, name: str):
    exts = EXTENSIONS + tuple(TABLE_EXTENSIONS)
    found = [folder / f"{name}{ext}" for ext in exts if (folder / f"{name}{ext}").is_file()]
    if len(found) > 1:
        raise UserError(f"{folder}: both {found[0].name} and {found[1].name} exist; keep one")
    return found[0] if found else None


def _read(path: Path) -> list:
    """(where, record) pairs of one data file: JSON here, Parquet/CSV through `datasets`."""
    if path.suffix.lower() in TABLE_EXTENSIONS:
        return read_table(path)
    return read_records(path)


def _carve(records: list, cfg, path: Path) -> tuple[list, list]:
    """Seeded train/valid split of one file's records; valid gets at least one."""
    n = len(records)
    if n < 2:
        raise UserError(
            f"{path}: only {n} record; need at least 2 to carve a validation set "
            f"(valid_split={cfg.valid_split}), or put a valid.jsonl next to it in a directory"
        )
    n_valid = min(n - 1, max(1, round(n * cfg.valid_split)))
    perm = np.random.default_rng(cfg.seed).permutation(n)
    is_valid = np.zeros(n, dtype=bool)
    is_valid[perm[:n_valid]] = True
    return [r for r, v in zip(records, is_valid) if not v], [
        r for r, v in zip(records, is_valid) if v
    ]


def _encode_record(
    record: dict, fmt: str, where: str, renderer: Renderer, cfg, budget: int
) -> tuple:
    """(ids, mask, whether text was cut) of a record, tokenizing at most a character budget of
    it: a record of any size costs what max_seq_length needs.  When a cut leaves too few tokens
    (a tokenizer that drops characters), the budget grows until it does not; truncation itself
    stays in tokens."""
    while True:
        clipped = record_size(record) > budget
        source = clip_record(record, budget) if clipped else record
        pieces, add_special = renderer.render(source, fmt, where)
        pieces, cut = cut_pieces(pieces, budget)
        ids, mask = encode(renderer.tok, pieces, add_special, renderer.eos_id)
        if not (clipped or cut) or len(ids) >= cfg.max_seq_length + MARGIN_TOKENS:
            return ids, mask, clipped or cut
        budget *= 4


def _tokenize(name: str, source: Path, records: list, fmt: str, renderer: Renderer, cfg) -> Split:
    budget = char_budget(cfg.max_seq_length, longest_token_chars(renderer.tok))
    sequences, masks = [], []
    truncated = dropped = untrained = 0
    for where, record in records:
        validate(record, fmt, where)
        ids, mask, cut = _encode_record(record, fmt, where, renderer, cfg, budget)
        if not cfg.mask_prompt:
            mask = np.ones(len(ids), dtype=bool)
        if len(ids):
            mask[0] = False
        if not mask.any() and not cut:
            untrained += 1  # nothing to learn even untruncated (e.g. no assistant turn)
        if len(ids) > cfg.max_seq_length:
            ids, mask = ids[: cfg.max_seq_length], mask[: cfg.max_seq_length]
            truncated += 1
        if not mask.any():
            dropped += 1
            continue
        sequences.append(ids)
        masks.append(mask)
    if not sequences:
        raise UserError(
            f"{source}: no usable {name} examples: " + _why_dropped(dropped, untrained, cfg)
        )
    return Split(name, str(source), sequences, masks, truncated, fmt, dropped)


def _why_dropped(dropped: int, untrained: int, cfg) -> str:
    if untrained == dropped:
        return (
            f"none of the {dropped} has a token to train on (with mask_prompt only completions "
            "and assistant turns are trained); give each record an assistant turn or completion, "
            "or set mask_prompt: false"
        )
    return (
        f"all {dropped} have no target token left (prompt at least "
        f"max_seq_length={cfg.max_seq_length} tokens?); raise max_seq_length or shorten the prompts"
    )


def _file_format(records: list, cfg) -> str:
    has_template = cfg.prompt_template is not None
    return check_same_format([detect_format(r, w, has_template) for w, r in records], records)


def load_splits(cfg, tokenizer) -> dict:
    """{'train', 'valid'[, 'test']: Split} from cfg.data (or cfg.hf_dataset), tokenized with
    `tokenizer`."""
    _need_data(cfg)
    renderer = Renderer(cfg, tokenizer)
    splits = {
        name: _tokenize_parts(name, found, renderer, cfg)
        for name, found in load_records(cfg).items()
    }
    for notice in renderer.notices:
        warnings.warn(notice, UserWarning, stacklevel=2)
    return splits


def load_records(cfg, file_format=None) -> dict:
    """{'train', 'valid'[, 'test']: [(source, [(where, record)], format)]}, before tokenizing
    (`mlxft evaluate` reads its prompts and references from here).  `file_format(records, cfg)`
    names a source's one format (default: the SFT formats; preference data passes its own)."""
    _need_data(cfg)
    file_format = file_format or _file_format
    found = read_parts(cfg) if external(cfg) else _local_parts(cfg)
    parts = {
        name: [(src, records, file_format(records, cfg)) for src, records in part]
        for name, part in found.items()
    }
    if "valid" not in parts:  # carve a validation set from each training source
        carved = [(src, fmt, _carve(records, cfg, src)) for src, records, fmt in parts["train"]]
        parts["train"] = [(src, train, fmt) for src, fmt, (train, _) in carved]
        parts["valid"] = [(src, valid, fmt) for src, fmt, (_, valid) in carved]
    return parts


def _need_data(cfg) -> None:
    if not cfg.data and cfg.hf_dataset is None:
        raise UserError("no data: pass --data DIR_OR_FILE or set 'data' in the config")


def _local_parts(cfg) -> dict:
    """{split: [(file, records)]} from a data directory or one data file."""
    path = Path(os.path.expanduser(str(cfg.data)))
    if not path.exists():
        raise UserError(
            f"{path}: data path not found; give a directory with train.jsonl "
            "(and optionally valid.jsonl, test.jsonl), a single .jsonl/.json/.parquet/.csv file, "
            "or a hub dataset id (org/name)"
        )
    if not path.is_dir():
        return {"train": [(path, _read(path))]}
    files = {name: _find(path, name) for name in SPLITS}
    if files["train"] is None:
        raise UserError(
            f"{path}: no train.jsonl (or train.json) in this directory; a data directory needs "
            "train.jsonl (or .json, .parquet, .csv) and optionally valid and test files"
        )
    return {name: [(file, _read(file))] for name, file in files.items() if file is not None}


def _tokenize_parts(name: str, found: list, renderer: Renderer, cfg) -> Split:
    """One split from one source (or several `hf_dataset` entries, each in its own format)."""
    splits = [_tokenize(name, src, records, fmt, renderer, cfg) for src, records, fmt in found]
    if len(splits) == 1:
        return splits[0]
    return Split(
        name,
        ", ".join(s.source for s in splits),
        [q for s in splits for q in s.sequences],
        [m for s in splits for m in s.masks],
        sum(s.truncated for s in splits),
        "+".join(dict.fromkeys(s.format for s in splits)),
        sum(s.dropped for s in splits),
    )
