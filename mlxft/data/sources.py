"""Records from the Hugging Face `datasets` library, for the same pipeline as our JSON files.

    --data org/name                 a hub dataset (HF_HUB_OFFLINE respected: the cache is used)
    hf_dataset: {path, ...}         mlx-lm's block: splits and feature (column) names
    --data DIR                      a `save_to_disk` directory
    file.parquet | file.csv         read for the loader (alone, or train/valid/test in a folder)

Each source becomes `(where, record)` pairs (`org/name[train][12]`, `file.csv[3]`) so every error
downstream names the row, exactly like `file.jsonl:12`.  Feature names are mapped onto our
canonical keys (`text`, `prompt`, `completion`, `messages`; ShareGPT turns keep `conversations`),
so format detection, rendering and masking are the JSON path's, unchanged.  Plain .jsonl data never
imports `datasets` (an optional extra: `pip install 'mlxft[datasets]'`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mlxft.errors import UserError

TABLE_EXTENSIONS = {".parquet": "parquet", ".csv": "csv"}
# mlx-lm's feature keys -> the record keys our format detection reads
FEATURES = {
    "text_feature": "text",
    "prompt_feature": "prompt",
    "completion_feature": "completion",
    "chat_feature": "messages",
}
# mlx-lm's defaults: the first 80% of train to train on, the last 10% to validate
DEFAULT_SPLITS = {"train_split": "train[:80%]", "valid_split": "train[-10%:]", "test_split": None}
VALID_NAMES = ("valid", "validation", "val", "dev")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

Parts = dict  # split name -> [(source, [(where, record)])]


def datasets_module():
    """`datasets`, quieted (its cache notices and progress bars would bury our one-line output)."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            "Hugging Face datasets (hub ids, Parquet, CSV, save_to_disk) need the datasets "
            "library: pip install 'mlxft[datasets]'"
        ) from None
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets


def is_hub_id(value: str) -> bool:
    """`org/name` that is not a local path (and has no data-file extension)."""
    path = Path(os.path.expanduser(value))
    return (
        not path.exists()
        and bool(_HUB_ID.match(value))
        and not value.startswith(".")
        and path.suffix.lower() not in (".jsonl", ".json", *TABLE_EXTENSIONS)
    )


def is_saved_dataset(path: Path) -> bool:
    """A directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    )


def external(cfg) -> bool:
    """Whether cfg's data goes through `datasets` (so the JSON-only path never imports it)."""
    if cfg.hf_dataset is not None:
        return True
    return is_saved_dataset(Path(os.path.expanduser(str(cfg.data)))) or is_hub_id(str(cfg.data))


def read_table(path: Path) -> list:
    """All rows of a .parquet / .csv file as (where, record); `where` is `file[row index]`."""
    datasets = datasets_module()
    kind = TABLE_EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"{path}: unsupported data file type '{path.suffix}'")
    try:
        options = _csv_as_text(path, datasets) if kind == "csv" else {}
        table = datasets.load_dataset(kind, data_files=str(path), split="train", **options)
    except Exception as err:  # pyarrow / pandas parse errors of many types
        raise UserError(f"{path}: cannot read this {kind} file ({_first_line(err)})") from None
    rows = _rows(table, str(path))
    if not rows:
        raise UserError(f"{path}: no records")
    return rows


def _csv_as_text(path: Path, datasets) -> dict:
    """CSV cells are text: read every column as a string (pandas would make "42" an int) and
    empty cells as "" (not NaN)."""
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle), [])
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return {"features": features, "keep_default_na": False}


def read_parts(cfg) -> Parts:
    """{'train', 'valid'?, 'test'?: [(source, records)]} for data that `external(cfg)` claims.
    'valid' is absent when the source has none (the loader then carves one from train)."""
    if cfg.hf_dataset is not None:
        entries = cfg.hf_dataset if isinstance(cfg.hf_dataset, list) else [cfg.hf_dataset]
        parts: Parts = {}
        for entry in entries:
            for name, part in _hf_entry(entry).items():
                parts.setdefault(name, []).append(part)
        return parts
    path = Path(os.path.expanduser(str(cfg.data)))
    if is_saved_dataset(path):
        return _named_splits(_load_from_disk(path), str(path))
    try:
        datasets_module()
    except UserError:  # most likely a mistyped local path: say that first
        raise UserError(
            f"{cfg.data}: data path not found; as a hub dataset id it needs the datasets library: "
            "pip install 'mlxft[datasets]'"
        ) from None
    return _named_splits(_load_hub(str(cfg.data)), str(cfg.data))


# --------------------------------------------------------------------------- sources
def _load_from_disk(path: Path):
    datasets = datasets_module()
    try:
        return datasets.load_from_disk(str(path))
    except Exception as err:  # damaged or foreign directories raise many types
        raise UserError(
            f"{path}: cannot read this save_to_disk directory ({_first_line(err)})"
        ) from None


def _load_hub(repo_id: str, **kwargs):
    """load_dataset for a hub id (or any path load_dataset accepts), errors as one line."""
    datasets = datasets_module()
    offline = datasets.config.HF_HUB_OFFLINE
    try:
        return datasets.load_dataset(repo_id, **kwargs)
    except ValueError as err:
        text = _first_line(err)
        if text.startswith("Unknown split"):
            raise UserError(
                f"{repo_id}: unknown split '{kwargs.get('split')}' ({text}); name an existing one "
                "in hf_dataset's train_split / valid_split / test_split"
            ) from None
        if "Couldn't find cache" in str(err):
            raise UserError(
                f"{repo_id}: config '{kwargs.get('name')}' is not in the local datasets cache "
                f"({' '.join(str(err).split())})"
            ) from None
        raise UserError(f"{repo_id}: cannot load this dataset ({text})") from None
    except Exception as err:  # ConnectionError, DatasetNotFoundError, FileNotFoundError, ...
        if offline:
            raise UserError(
                f"{repo_id}: no such local path, and not a dataset in the Hugging Face datasets "
                "cache while HF_HUB_OFFLINE=1; load it once with network access, or pass a local "
                "file or directory"
            ) from None
        raise UserError(
            f"{repo_id}: cannot load this dataset ({type(err).__name__}: {_first_line(err)})"
        ) from None


def _named_splits(data, source: str) -> Parts:
    """A DatasetDict's train / valid (or validation) / test splits; a lone Dataset is 'train'."""
    if not hasattr(data, "keys"):
        return {"train": [(source, _rows(data, source))]}
    names = list(data.keys())
    if "train" not in names:
        raise UserError(
            f"{source}: no 'train' split (it has: {', '.join(names)}); name the splits with an "
            "hf_dataset block: {path: ..., train_split: ..., valid_split: ...}"
        )
    out = {"train": [(f"{source}[train]", _rows(data["train"], f"{source}[train]"))]}
    valid = next((n for n in VALID_NAMES if n in names), None)
    if valid:
        out["valid"] = [(f"{source}[{valid}]", _rows(data[valid], f"{source}[{valid}]"))]
    if "test" in names:
        out["test"] = [(f"{source}[test]", _rows(data["test"], f"{source}[test]"))]
    return out


def _hf_entry(entry: dict) -> Parts:
    """One `hf_dataset` mapping: its splits (mlx-lm's defaults), features renamed to our keys."""
    path = entry["path"]
    kwargs = dict(entry.get("config") or {})
    if entry.get("name"):
        kwargs["name"] = entry["name"]
    splits = {key: entry.get(key, default) for key, default in DEFAULT_SPLITS.items()}
    wanted = {
        "train": splits["train_split"],
        "valid": splits["valid_split"],
        "test": splits["test_split"],
    }
    out = {}
    for name, split in wanted.items():
        if not split:
            continue
        source = f"{path}[{split}]"
        table = _load_hub(path, split=split, **kwargs)
        renames = _renames(entry, table.column_names, source)
        out[name] = (source, [(w, _rename(r, renames)) for w, r in _rows(table, source)])
    if "train" not in out:
        raise UserError(f"hf_dataset {path}: train_split is empty; name the split to train on")
    return out


def _renames(entry: dict, columns: list, source: str) -> list:
    """[(column, our key)] for the entry's *_feature keys; a missing column is the user's error."""
    out = []
    for key, canonical in FEATURES.items():
        feature = entry.get(key)
        if not feature:
            continue
        if feature not in columns:
            raise UserError(
                f"{source}: no column '{feature}' (hf_dataset.{key}); the columns are "
                f"{', '.join(columns)}"
            )
        out.append((feature, canonical))
    return out


def _rename(record: dict, renames: list) -> dict:
    """Columns to our format keys; a chat column of ShareGPT turns becomes `conversations`."""
    for feature, canonical in renames:
        value = record.pop(feature)
        if (
            canonical == "messages"
            and isinstance(value, list)
            and value
            and isinstance(value[0], dict)
            and "from" in value[0]
        ):
            canonical = "conversations"
        record[canonical] = value
    return record


def _rows(table, source: str) -> list:
    """Dataset rows as (where, plain dict): `where` is `source[row]`."""
    return [(f"{source}[{i}]", dict(row)) for i, row in enumerate(table.to_list())]


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
