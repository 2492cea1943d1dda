"""Hugging Face model directories: reading their config, and writing them with numpy only.

A model directory is `config.json`, safetensors weights (one file, or shards plus
`model.safetensors.index.json`) and the tokenizer and generation files beside them.  The writer
needs no tensor framework, so a full fine-tune saved by the torch backend never imports MLX,
and conversions from MLX hand it numpy arrays.  numpy has no bfloat16, so a bfloat16 tensor
travels as its raw bits (`BF16`).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
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
# Bytes per element of the safetensors dtypes (for the size check of each tensor's data).
ST_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U64": 8, "I32": 4, "U32": 4,
    "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
# config.json values every loader multiplies or indexes with: a string there crashes deep inside
_CONFIG_COUNTS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "head_dim",
    "n_layer",
    "n_embd",
    "n_head",
)
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth")


def weight_files(path: Path) -> list:
    """The safetensors files a model directory's weights are read from: `model*.safetensors`,
    the names mlx-lm and transformers both load (any other *.safetensors is not the model)."""
    return sorted(Path(path).glob("model*.safetensors"))


def check_safetensors(path: Path, what: str, fix: str = "") -> dict:
    """A safetensors file's header, checked against the file: present, not empty, a JSON header
    of plausible length, every tensor's byte range inside the file and of its shape's size.
    Reads the header only.  `what` names the file's role, `fix` says what to do."""
    fix = f"; {fix}" if fix else ""

    def bad(problem: str) -> UserError:
        return UserError(f"{path}: {what} file {problem}{fix}")

    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if length is None:
                raise bad(f"is empty or truncated ({size} bytes)")
            if length > min(size - 8, _MAX_HEADER):
                raise bad("is not in safetensors format (damaged, or another format)")
            header = json.loads(handle.read(length))
    except FileNotFoundError:
        raise bad("is missing") from None
    except OSError as err:
        raise bad(f"cannot be read ({err.strerror})") from None
    except (ValueError, UnicodeDecodeError):
        raise bad("is not in safetensors format (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise bad("is not in safetensors format (its header is not an object)")
    data = size - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            count = math.prod(info["shape"])
            width = ST_DTYPE_BYTES.get(info["dtype"])
            if not (0 <= start <= end) or (width is not None and end - start != count * width):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise bad(f"has a malformed entry for tensor {name!r}") from None
        if end > data:
            raise bad(f"is truncated ({size} bytes; tensor {name!r} needs {8 + length + end})")
    return header


def _read_json(path: Path, fix: str):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: invalid JSON ({err.msg}); {fix}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; {fix}") from None
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror}); {fix}") from None


def _pickle_advice(allow_pickle: bool | None) -> str:
    """`allow_pickle` None: the command has no --allow-pickle, so point at the one that does."""
    if allow_pickle is None:
        return (
            "Convert them to safetensors first (if you trust the source: mlxft convert "
            "--hf-path DIR --mlx-path OUT --allow-pickle)"
        )
    return "Convert them to safetensors, or pass --allow-pickle if you trust the source"


def check_model_dir(path: Path, allow_pickle: bool | None = None) -> None:
    """config.json and weights present and readable, before any backend spends time loading:
    every weight file's header is checked against its size, so a truncated download is one
    line here rather than a crash inside a loader.  `allow_pickle` is the command's
    --allow-pickle (None: the command has none)."""
    fix = "re-download or re-convert the model"
    if not (path / "config.json").is_file():
        raise UserError(
            f"{path}: no config.json; a model directory needs config.json and *.safetensors weights"
        )
    config = _read_json(path / "config.json", fix)
    weights = weight_files(path)
    if not weights:
        pickles = [p for pattern in PICKLE_PATTERNS for p in sorted(path.glob(pattern))]
        stray = sorted(path.glob("*.safetensors"))
        also = f"; {stray[0].name} is not a model weight file" if stray else ""
        if pickles and not allow_pickle:
            raise UserError(
                f"{path}: only pickle weights ({pickles[0].name}{also}); pickle can run "
                f"arbitrary code when loaded. {_pickle_advice(allow_pickle)}"
            )
        if not pickles:
            raise UserError(
                f"{path}: no *.safetensors weights{f' ({also[2:]})' if also else ''}; the model "
                "directory is incomplete"
            )
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = _index_shards(index, fix)
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise UserError(
                f"{path}: weight shard {missing[0]} listed in {index.name} is missing; "
                "re-download the model"
            )
    for file in weights:
        check_safetensors(file, "weight", fix)
    _check_config(path / "config.json", config, fix)


def _index_shards(index: Path, fix: str) -> set:
    data = _read_json(index, fix)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) and "/" not in v and v.endswith(".safetensors")
        for v in weight_map.values()
    ):
        raise UserError(
            f"{index}: not a shard index (needs a 'weight_map' of tensor name -> "
            f"*.safetensors file); {fix}"
        )
    return set(weight_map.values())


def _check_config(path: Path, config, fix: str) -> None:
    if not isinstance(config, dict):
        raise UserError(
            f"{path}: must be a JSON object of model settings, got {type(config).__name__}; {fix}"
        )
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise UserError(f"{path}: no 'model_type' (e.g. \"llama\"); {fix}")
    for key in _CONFIG_COUNTS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise UserError(f"{path}: '{key}' must be a whole number, got {value!r}; {fix}")
        if value is not None and value < 1:
            raise UserError(f"{path}: '{key}' must be at least 1, got {value}; {fix}")


def read_model_config(path: Path) -> dict:
    """config.json, normalised for mlx-lm: transformers >= 5 moved `rope_theta` into
    `rope_parameters`, and mlx-lm's model classes fall back to their own default (1e6 for
    qwen2) when it is absent.  `hf_config` undoes this for writing."""
    config = _read_json(path / "config.json", "re-download or re-convert the model")
    if not isinstance(config, dict):
        raise UserError(
            f"{path / 'config.json'}: must be a JSON object of model settings, "
            f"got {type(config).__name__}"
        )
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
