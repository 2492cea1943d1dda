"""Hugging Face model directories: reading their config, and writing them with numpy only.

A model directory is `config.json`, safetensors weights (one file, or shards plus
`model.safetensors.index.json`) and the tokenizer and generation files beside them.  The writer
needs no tensor framework, so a full fine-tune saved by the torch backend never imports MLX,
and conversions from MLX hand it numpy arrays.  numpy has no bfloat16, so a bfloat16 tensor
travels as its raw bits (`BF16`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxft.errors import UserError
from mlxft.fileio import atomic_dir

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


# ---------------------------------------------------------------------------- reading
def check_model_dir(path: Path, allow_pickle: bool = False) -> None:
    """config.json and weights present and readable, before any backend spends time loading."""
    if not (path / "config.json").is_file():
        raise UserError(
            f"{path}: no config.json; a model directory needs config.json and *.safetensors weights"
        )
    try:
        json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path / 'config.json'}:{err.lineno}: invalid JSON ({err.msg})") from None
    if not list(path.glob("*.safetensors")):
        pickles = list(path.glob("*.bin")) + list(path.glob("*.pt")) + list(path.glob("*.pth"))
        if pickles and not allow_pickle:
            raise UserError(
                f"{path}: only pickle weights ({pickles[0].name}); pickle can run arbitrary code "
                "when loaded. Convert them to safetensors, or pass --allow-pickle if you trust "
                "the source"
            )
        if not pickles:
            raise UserError(f"{path}: no *.safetensors weights; the model directory is incomplete")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise UserError(
                f"{path}: weight shard {missing[0]} listed in {index.name} is missing; "
                "re-download the model"
            )


def read_model_config(path: Path) -> dict:
    """config.json, normalised for mlx-lm: transformers >= 5 moved `rope_theta` into
    `rope_parameters`, and mlx-lm's model classes fall back to their own default (1e6 for
    qwen2) when it is absent.  `hf_config` undoes this for writing."""
    config = json.loads((path / "config.json").read_text())
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" not in config and "rope_theta" in rope:
            config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
            config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return config


def hf_config(config: dict) -> dict:
    """A config for transformers: without MLX quantization keys and without the top-level rope
    keys `read_model_config` copied out of transformers-5 `rope_parameters`."""
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" in rope and config.get("rope_theta") == rope["rope_theta"]:
            config.pop("rope_theta")
        if config.get("rope_scaling") == {k: v for k, v in rope.items() if k != "rope_theta"}:
            config.pop("rope_scaling")
    return config


# ---------------------------------------------------------------------------- tensors
@dataclass(frozen=True)
class BF16:
    """A bfloat16 tensor as its raw bits (uint16), since numpy has no bfloat16 type."""

    bits: np.ndarray

    @property
    def shape(self) -> tuple:
        return self.bits.shape

    @property
    def nbytes(self) -> int:
        return self.bits.nbytes

    def to_float32(self) -> np.ndarray:
        return (self.bits.astype(np.uint32) << 16).view(np.float32)

    @classmethod
    def from_float32(cls, x: np.ndarray) -> BF16:
        """Round to nearest even, as every framework casts; NaN stays NaN."""
        word = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        rounded = (word + 0x7FFF + ((word >> 16) & 1)) >> 16
        quiet_nan = (word >> 16) | 0x40
        return cls(np.where(np.isnan(x), quiet_nan, rounded).astype(np.uint16))


Tensor = np.ndarray | BF16


def float_dtype(value: Tensor) -> str | None:
    """'float32' | 'float16' | 'bfloat16' for a floating tensor, None otherwise."""
    if isinstance(value, BF16):
        return "bfloat16"
    return value.dtype.name if np.issubdtype(value.dtype, np.floating) else None


def cast(value: Tensor, dtype: str | None) -> Tensor:
    """`value` in `dtype` when it is floating (integers, e.g. packed weights, pass through)."""
    have = float_dtype(value)
    if dtype is None or have is None or have == dtype:
        return value
    wide = value.to_float32() if isinstance(value, BF16) else value.astype(np.float32)
    return BF16.from_float32(wide) if dtype == "bfloat16" else wide.astype(dtype)


def check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: not supported; use one of {', '.join(DTYPES)}")


def set_config_dtype(config: dict, dtype: str) -> None:
    """transformers 5 reads `dtype`, older versions `torch_dtype`: update whichever it has."""
    for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
        config[key] = dtype


def _save_file(tensors: Mapping[str, Tensor], path: Path, fmt: str) -> None:
    """One safetensors file; bfloat16 written from its bits (safetensors.numpy has no such type)."""
    import safetensors

    spec = getattr(safetensors, "TensorSpec", None)  # zero-copy specs in newer safetensors
    keep, specs = [], {}
    for name in sorted(tensors):
        value = tensors[name]
        array = np.ascontiguousarray(value.bits if isinstance(value, BF16) else value)
        keep.append(array)
        kind = "bfloat16" if isinstance(value, BF16) else array.dtype.name
        specs[name] = (
            spec(dtype=kind, shape=array.shape, data_ptr=array.ctypes.data, data_len=array.nbytes)
            if spec
            else {"dtype": kind, "shape": list(array.shape), "data": array.tobytes()}
        )
    safetensors.serialize_file(specs, str(path), metadata={"format": fmt})


def write_safetensors(
    weights: Mapping[str, Tensor], out_dir: Path, fmt: str, max_bytes: int = SHARD_BYTES
) -> None:
    """`model.safetensors`, or `model-0000i-of-0000n.safetensors` + index above `max_bytes`.

    `fmt` is the safetensors metadata format: "pt" for transformers, "mlx" for mlx-lm."""
    shards: list[list[str]] = []
    size = 0
    for name in sorted(weights):
        nbytes = weights[name].nbytes
        if not shards or size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) <= 1:
        _save_file(weights, Path(out_dir) / "model.safetensors", fmt)
        return
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": {}}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save_file({n: weights[n] for n in names}, Path(out_dir) / file, fmt)
        index["weight_map"].update(dict.fromkeys(names, file))
    (Path(out_dir) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def copy_aux_files(src_dir: Path | None, out_dir: Path) -> list[str]:
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


# ---------------------------------------------------------------------------- writing
def save_hf_dir(
    weights: Mapping[str, Tensor],
    config: dict,
    src_dir: Path | None,
    out_dir: Path,
    dtype: str | None = None,
    verify: bool = True,
    max_shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Write a transformers-loadable directory: config.json, safetensors (sharded + index above
    ~5 GB), tokenizer files and generation_config.json copied from `src_dir`.  Atomic, and
    refused when `out_dir` is not empty.

    `weights` use HF names and must be de-quantized; `dtype` casts the floating tensors.  With
    `verify`, the names are checked against the architecture transformers builds from
    `config` (on the meta device, no memory) before the directory appears, so a name mlx-lm
    spells differently fails here and not at the user's load time."""
    check_dtype(dtype)
    packed = sorted(k for k in weights if k.endswith(".scales"))
    if packed:
        raise UserError(
            f"{packed[0]}: quantized weights cannot be written as a HF model; de-quantize them "
            f"first"
        )
    arrays = {k: cast(v, dtype) for k, v in weights.items()}
    drop = ("quantization", "quantization_config", "_name_or_path")
    config = {k: v for k, v in config.items() if k not in drop}
    floats = {float_dtype(v) for v in arrays.values()} - {None}
    if dtype is not None or len(floats) == 1:
        set_config_dtype(config, dtype or floats.pop())
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if verify:
            verify_hf_names(tmp, set(arrays))
        write_safetensors(arrays, tmp, "pt", max_shard_bytes)
        copy_aux_files(src_dir, tmp)
    return Path(out_dir)


def verify_hf_names(config_dir: Path, names: set[str]) -> None:
    """Compare tensor names with the parameters transformers expects; tied copies may be absent.
    Skipped when torch is not installed (transformers cannot build the model to compare)."""
    try:
        import torch
        import transformers
    except ImportError:
        return
    try:
        hf_config = transformers.AutoConfig.from_pretrained(config_dir)
    except (ValueError, KeyError):  # an architecture this transformers does not know
        return
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    by_param: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(name)
    persistent = set(model.state_dict())
    expected = persistent | {n for group in by_param.values() for n in group}
    extra = sorted(names - expected)
    if extra:
        raise UserError(
            f"{extra[0]}: no such tensor in transformers' {type(model).__name__}; "
            "cannot write a HF model"
        )
    missing = sorted(
        n for group in by_param.values() if not any(g in names for g in group) for n in group
    )
    if missing:
        raise UserError(
            f"{missing[0]}: missing from the weights; transformers' {type(model).__name__} needs it"
        )
