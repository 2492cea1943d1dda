"""Where a model lives: a local directory or a Hugging Face hub id, checked before any backend loads it.

Both backends call `resolve_model` so a missing file, a pickle-only checkpoint or an
offline cache miss is one clear line, the same on MLX and torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from mlxft.errors import UserError

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]


def resolve_model(name: str, revision: Optional[str] = None, allow_pickle: bool = False) -> Path:
    """A local directory holding config.json + safetensors weights (downloading a hub id if needed)."""
    path = Path(os.path.expanduser(name))
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        if not path.is_dir():
            raise UserError(f"{path}: model directory not found (pass a directory or a hub id like org/name)")
    else:
        path = _download(name, revision)
    check_model_dir(path, allow_pickle=allow_pickle)
    return path


def _download(repo_id: str, revision: Optional[str]) -> Path:
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=WEIGHT_PATTERNS, local_files_only=offline)
        )
    except Exception as err:  # huggingface_hub raises many types; all mean "not available"
        if offline:
            raise UserError(
                f"{repo_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE=1; "
                "download it once with network access or pass a local directory"
            ) from None
        raise UserError(f"{repo_id}: could not download from the Hugging Face hub ({type(err).__name__}: {err})") from None


def check_model_dir(path: Path, allow_pickle: bool = False) -> None:
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json; a model directory needs config.json and *.safetensors weights")
    try:
        json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path / 'config.json'}:{err.lineno}: invalid JSON ({err.msg})") from None
    if not list(path.glob("*.safetensors")):
        pickles = list(path.glob("*.bin")) + list(path.glob("*.pt")) + list(path.glob("*.pth"))
        if pickles and not allow_pickle:
            raise UserError(
                f"{path}: only pickle weights ({pickles[0].name}); pickle can run arbitrary code when loaded. "
                "Convert them to safetensors, or pass --allow-pickle if you trust the source"
            )
        if not pickles:
            raise UserError(f"{path}: no *.safetensors weights; the model directory is incomplete")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise UserError(f"{path}: weight shard {missing[0]} listed in {index.name} is missing; re-download the model")


def read_model_config(path: Path) -> dict:
    """config.json, normalised for mlx-lm: transformers >= 5 moved `rope_theta` into `rope_parameters`,
    and mlx-lm's model classes fall back to their own default (1e6 for qwen2) when it is absent."""
    config = json.loads((path / "config.json").read_text())
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" not in config and "rope_theta" in rope:
            config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
            config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return config
