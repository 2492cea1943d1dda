"""Writing model directories: atomically, in shards, with the tokenizer and generation config beside them.

Every writer (convert to MLX, convert to HF, fuse) goes through `atomic_output_dir`, so a
crash, a Ctrl-C or a failed check leaves either the old destination or the complete new
one, never a half-written directory that a later run would mistake for a model.
"""

from __future__ import annotations

import mlxft  # noqa: F401  (OpenBLAS before mlx.core, even if convert/__init__ was bypassed)
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Optional

import mlx.core as mx
import numpy as np

from mlxft.errors import UserError

SHARD_BYTES = 5 * 10**9  # the hub's convention: ~5 GB per safetensors file
DTYPES = ("float16", "bfloat16", "float32")

# Everything a tokenizer or generation needs; weights, config.json and code are left out on purpose
# (remote code is never copied, so a converted directory never asks to run it).
AUX_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
    "chat_template*",
    "*.jinja",
    "generation_config.json",
    "preprocessor_config.json",
)


def check_destination(out_dir: Path, overwrite: bool = False) -> None:
    """Refuse a non-empty destination up front, before any slow load, unless `overwrite`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory; pick another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir}: already exists and is not empty; remove it or pick another output path")


@contextlib.contextmanager
def atomic_output_dir(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir next to `out_dir`; on success it replaces `out_dir` by rename, on error it is removed.

    The temp dir lives in the same parent so the final rename never crosses a filesystem.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    check_destination(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        check_destination(out_dir, overwrite)  # someone may have written there meanwhile
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "d")
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_aux_files(src_dir: Optional[Path], out_dir: Path) -> list[str]:
    """Copy tokenizer files and generation_config.json from `src_dir`; returns the names copied."""
    if src_dir is None:
        return []
    copied = []
    for pattern in AUX_PATTERNS:
        for f in sorted(Path(src_dir).glob(pattern)):
            if f.is_file() and f.name not in copied:
                shutil.copy2(f, Path(out_dir) / f.name)
                copied.append(f.name)
    return copied


def _shards(weights: Mapping[str, mx.array], max_bytes: int) -> list[dict]:
    shards, size = [], 0
    for k in sorted(weights):
        v = weights[k]
        if not shards or size + v.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    return shards


def write_safetensors(weights: Mapping[str, mx.array], out_dir: Path, fmt: str, max_bytes: int = SHARD_BYTES) -> None:
    """`model.safetensors`, or `model-0000i-of-0000n.safetensors` + index when above `max_bytes`.

    `fmt` is the safetensors metadata format: "pt" for transformers, "mlx" for mlx-lm.
    """
    shards = _shards(weights, max_bytes)
    if len(shards) == 1:
        mx.save_safetensors(str(Path(out_dir) / "model.safetensors"), shards[0], metadata={"format": fmt})
        return
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": {}}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(Path(out_dir) / name), shard, metadata={"format": fmt})
        index["weight_map"].update({k: name for k in shard})
    (Path(out_dir) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def as_mx(v) -> mx.array:
    return v if isinstance(v, mx.array) else mx.array(np.asarray(v))


def set_config_dtype(config: dict, dtype: str) -> None:
    """transformers 5 reads `dtype`, older versions `torch_dtype`: update whichever the config has."""
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    for k in keys:
        config[k] = dtype


def check_dtype(dtype: Optional[str]) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: not supported; use one of {', '.join(DTYPES)}")


def save_hf_dir(
    weights: Mapping[str, object],
    config: dict,
    src_dir: Optional[Path],
    out_dir: Path,
    overwrite: bool = False,
    dtype: Optional[str] = None,
    verify: bool = True,
    max_shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Write a transformers-loadable directory: config.json, safetensors (sharded + index above
    ~5 GB), tokenizer files and generation_config.json copied from `src_dir`. Atomic.

    `weights` use HF names (mx.array or np.ndarray) and must be de-quantized. `dtype` casts
    the floating tensors. With `verify`, the names are checked against the architecture
    transformers builds from `config` (on the meta device, no memory) before the directory
    appears, so a name mlx-lm spells differently fails here and not at the user's load time.
    """
    check_dtype(dtype)
    packed = sorted(k for k in weights if k.endswith(".scales"))
    if packed:
        raise UserError(f"{packed[0]}: quantized weights cannot be written as a HF model; de-quantize them first")
    arrays = {k: as_mx(v) for k, v in weights.items()}
    if dtype is not None:
        target = getattr(mx, dtype)
        arrays = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in arrays.items()}
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config", "_name_or_path")}
    floats = {str(v.dtype).split(".")[-1] for v in arrays.values() if mx.issubdtype(v.dtype, mx.floating)}
    if dtype is not None or len(floats) == 1:
        set_config_dtype(config, dtype or floats.pop())
    with atomic_output_dir(out_dir, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if verify:
            verify_hf_names(tmp, set(arrays))
        write_safetensors(arrays, tmp, "pt", max_shard_bytes)
        copy_aux_files(src_dir, tmp)
    return Path(out_dir)


def verify_hf_names(config_dir: Path, names: set[str]) -> None:
    """Compare tensor names with the parameters transformers expects; tied copies may be absent."""
    import torch
    import transformers

    try:
        hf_config = transformers.AutoConfig.from_pretrained(config_dir)
    except (ValueError, KeyError):  # an architecture this transformers does not know: nothing to check against
        return
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    by_param: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(name)
    persistent = {n for n, _ in model.state_dict().items()}
    expected = persistent | {n for group in by_param.values() for n in group}
    extra = sorted(names - expected)
    if extra:
        raise UserError(f"{extra[0]}: no such tensor in transformers' {type(model).__name__}; cannot write a HF model")
    missing = sorted(
        n for group in by_param.values() if not any(g in names for g in group) for n in group
    )
    if missing:
        raise UserError(f"{missing[0]}: missing from the weights; transformers' {type(model).__name__} needs it")
