"""Where models come from and go to: local directories, the Hugging Face hub, tokenizers.

Both backends call `resolve_model`, so a missing file, a pickle-only checkpoint or an offline
cache miss is one clear line, the same on MLX and torch.  `upload` pushes a finished
directory; `load_tokenizer` is the one place a tokenizer is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlxft import flags
from mlxft.errors import UserError, engine_message
from mlxft.model_dir import check_model_dir, read_model_config

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]


def resolve_model(name: str, revision: str | None = None, allow_pickle: bool | None = None) -> Path:
    """A local directory holding config.json + safetensors weights (downloading a hub id if
    needed), checked (`check_model_dir`).  `allow_pickle`: the command's --allow-pickle, None
    when it has none."""
    path = Path(os.path.expanduser(name))
    if not _is_hub_id(name):
        if not path.is_dir():
            raise UserError(
                f"{path}: model directory not found (pass a directory or a hub id like org/name)"
            )
    else:
        path = _download(name, revision)
    check_model_dir(path, allow_pickle=allow_pickle)
    return path


def _is_hub_id(name: str) -> bool:
    return not (Path(os.path.expanduser(name)).exists() or name.startswith((".", "/", "~"))) and (
        name.count("/") == 1
    )


def model_config(name: str, revision: str | None = None) -> dict:
    """config.json of a local model directory or a hub id, fetching that one file and never
    the weights (adapter import/export only need the number of blocks)."""
    if not _is_hub_id(name):
        path = Path(os.path.expanduser(name)) / "config.json"
        if not path.is_file():
            raise UserError(f"{path.parent}: no config.json; pass a model directory or a hub id")
        return read_model_config(path.parent)
    from huggingface_hub import hf_hub_download

    try:
        file = hf_hub_download(
            name, "config.json", revision=revision, local_files_only=flags.hub_offline()
        )
    except Exception as err:  # huggingface_hub raises many types; all mean "not available"
        raise UserError(f"{name}: cannot read its config.json ({type(err).__name__})") from None
    return read_model_config(Path(file).parent)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    offline = flags.hub_offline()
    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=WEIGHT_PATTERNS, local_files_only=offline
            )
        )
    except Exception as err:  # huggingface_hub raises many types; all mean "not available"
        if offline:
            raise UserError(
                f"{repo_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE=1; "
                "download it once with network access or pass a local directory"
            ) from None
        raise UserError(
            f"{repo_id}: no such local directory, and the Hugging Face hub did not provide it "
            f"({type(err).__name__}: {engine_message(err)}); check the path or the hub id"
        ) from None


def load_tokenizer(model_path: Path, cfg=None):
    """transformers' tokenizer for `model_path`; the run's config `cfg` says whether its own
    code may run (`trust_remote_code`, off by default)."""
    from transformers import AutoTokenizer

    trust = bool(getattr(cfg, "trust_remote_code", False))
    try:
        return AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=trust)
    except Exception as err:  # transformers and tokenizers raise many types on damaged files
        reason = (str(err).splitlines() or [""])[0] or type(err).__name__
        raise UserError(
            f"{model_path}: cannot load the tokenizer ({type(err).__name__}: {reason[:200]}); "
            "check its tokenizer files or re-download the model"
        ) from None


def upload(path: Path, repo_id: str | None) -> str | None:
    """Create the repo if needed and push the directory; returns its URL (None: no repo given)."""
    if not repo_id:
        return None
    from huggingface_hub import create_repo, upload_folder

    try:
        create_repo(repo_id, exist_ok=True)
        upload_folder(repo_id=repo_id, folder_path=str(path), repo_type="model")
    except Exception as err:  # hub errors are many types; all mean the push failed
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise UserError(f"{repo_id}: upload failed ({reason}); the files are in {path}") from None
    return f"https://huggingface.co/{repo_id}"
