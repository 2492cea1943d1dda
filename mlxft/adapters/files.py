"""Adapter directories in PEFT's layout, so `peft.PeftModel.from_pretrained` loads them as is.

adapter_model.safetensors holds `base_model.model.<module>.lora_A.weight` (r, in) and
`lora_B.weight` (out, r); adapter_config.json carries `r`, `lora_alpha = scale * r`,
`target_modules` and `layers_to_transform` for partial depth.  DoRA adds
`base_model.model.<module>.lora_magnitude_vector` (out,) and `use_dora: true`, as PEFT saves them.

A full fine-tune (`fine_tune_type: full`) has no adapter: its `adapter_path` holds a whole
Hugging Face model directory instead (`save_full_model`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mlxft.errors import UserError
from mlxft.fileio import ensure_dir, save_safetensors, write_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MLX_LM_WEIGHTS = "adapters.safetensors"  # mlx-lm's layout (mlxft.adapters.interop)
PREFIX = "base_model.model."


def is_mlx_lm_adapter(path: Path) -> bool:
    """mlx-lm's adapter directory (its weights file, not ours)."""
    path = Path(path)
    return (path / MLX_LM_WEIGHTS).is_file() and not (path / WEIGHTS_NAME).is_file()


def peft_key(path: str, name: str) -> str:
    """`lora_A` -> base_model.model.<path>.lora_A.weight; DoRA's magnitude has no `.weight`."""
    if name == "lora_magnitude_vector":
        return f"{PREFIX}{path}.lora_magnitude_vector"
    return f"{PREFIX}{path}.{name}.weight"


def split_key(key: str) -> tuple:
    """Inverse of `peft_key`: (module path, lora_A | lora_B | lora_magnitude_vector)."""
    body = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    if body.endswith(".weight"):
        body = body[: -len(".weight")]
    path, dot, name = body.rpartition(".")
    if not dot or not path:
        raise ValueError(f"{key!r} names no module")
    return path, name


ADAPTER_TENSORS = ("lora_A", "lora_B", "lora_magnitude_vector")


def match_adapter_weights(weights: dict, layers: dict, kind: str) -> list:
    """[(layer, tensor name, value)] for loading `weights` ({PEFT key: array}) into `layers`
    ({module path: adapter layer}), after checking every key and shape: the first mismatch is a
    UserError naming the module.  Shared by both backends; each then only copies the values."""
    plan = []
    for key, value in weights.items():
        path, name = split_key(key)
        if path not in layers or name not in ADAPTER_TENSORS:
            raise UserError(
                f"adapter has weights for module '{path}', which this model has no adapter slot for"
            )
        current = getattr(layers[path], name, None)
        if current is None:
            what = "DoRA" if name == "lora_magnitude_vector" else name
            raise UserError(
                f"adapter has {what} weights for module '{path}', which this run's {kind.upper()} "
                f"layers "
                "do not have; set fine_tune_type to match the adapter"
            )
        if tuple(current.shape) != tuple(value.shape):
            raise UserError(
                f"adapter module '{path}' {name} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(current.shape)}"
            )
        plan.append((layers[path], name, value))
    return plan


def adapter_config(plan, base_model: str) -> dict:
    partial = plan.layers != list(range(plan.num_blocks))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": plan.rank,
        "lora_alpha": plan.scale * plan.rank,
        "lora_dropout": plan.dropout,
        "target_modules": plan.module_names,
        "layers_to_transform": plan.layers if partial else None,
        "layers_pattern": "layers" if partial else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": plan.kind == "dora",
        "use_rslora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


QUANTIZE_KEY = "mlxft.quantize"  # safetensors metadata: the base was quantized to N bits on load
GROUP_SIZE_KEY = "mlxft.q_group_size"


def save_adapter(
    out_dir: Path, weights: dict, config: dict, quantization: dict | None = None
) -> None:
    """weights: {peft key: np.ndarray}. Each file is written atomically.

    `quantization` ({quantize, q_group_size}: a QLoRA run that quantized its base on load) goes
    into the weights file's own metadata, so it can never be read off another run's files
    (`trained_quantization`); PEFT ignores metadata."""
    out_dir = ensure_dir(Path(out_dir))
    tensors = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in weights.items()}
    metadata = {"format": "pt"}
    if quantization and quantization.get("quantize"):
        metadata[QUANTIZE_KEY] = str(quantization["quantize"])
        metadata[GROUP_SIZE_KEY] = str(quantization["q_group_size"])
    save_safetensors(out_dir / WEIGHTS_NAME, tensors, metadata=metadata)
    write_json(out_dir / CONFIG_NAME, config)


def trained_quantization(adapter_dir: Path | str | None) -> dict:
    """{quantize, q_group_size} when the adapter's own weights file says its base was quantized
    on load (`save_adapter`), else {}: never from a config file beside it, which may belong to
    another run."""
    from mlxft.model_dir import check_safetensors

    if not adapter_dir:
        return {}
    path = Path(adapter_dir).expanduser() / WEIGHTS_NAME
    try:
        metadata = check_safetensors(path, "adapter weights").get("__metadata__") or {}
        if QUANTIZE_KEY not in metadata:
            return {}
        return {
            "quantize": int(metadata[QUANTIZE_KEY]),
            "q_group_size": int(metadata.get(GROUP_SIZE_KEY, 64)),
        }
    except (UserError, ValueError, TypeError, AttributeError):
        return {}  # a damaged adapter is reported by load_adapter


def save_full_model(out_dir: Path, weights: dict, model_path: Path, dtype: str) -> None:
    """Write a full fine-tune into `out_dir` as a Hugging Face model directory (config.json from
    the base, safetensors in the training `dtype`, tokenizer files) that transformers and
    `--model` load.

    `out_dir` also holds the run's metrics and checkpoints, so the model is staged in a
    sub-directory by `mlxft.model_dir.save_hf_dir` (which checks the names against
    transformers) and its files are then moved in one by one, each replace atomic; shards of an
    earlier save that the new one does not have are removed."""
    import os
    import shutil

    from mlxft.model_dir import hf_config, save_hf_dir

    out_dir = ensure_dir(Path(out_dir))
    staging = out_dir / ".model-staging"
    shutil.rmtree(staging, ignore_errors=True)
    config = hf_config(json.loads((Path(model_path) / "config.json").read_text()))
    save_hf_dir(weights, config, Path(model_path), staging, dtype=dtype)
    new = {f.name for f in staging.iterdir()}
    for old in out_dir.glob("model*.safetensors*"):
        if old.name not in new:
            old.unlink()
    # config last: it marks a model directory
    for f in sorted(staging.iterdir(), key=lambda f: f.name == "config.json"):
        os.replace(f, out_dir / f.name)
    shutil.rmtree(staging, ignore_errors=True)


# adapter_config.json keys we read, and the types they must have
_CONFIG_TYPES = {
    "r": (int,),
    "lora_alpha": (int, float),
    "lora_dropout": (int, float),
    "use_dora": (bool,),
    "use_rslora": (bool,),
}
_NDIM = {"lora_A": 2, "lora_B": 2, "lora_magnitude_vector": 1}


def _check_config(config_path: Path, config) -> dict:
    if not isinstance(config, dict):
        raise UserError(
            f"{config_path}: must be a JSON object (PEFT's adapter settings), got "
            f"{type(config).__name__}"
        )
    for key, types in _CONFIG_TYPES.items():
        value = config.get(key)
        wrong = isinstance(value, bool) and bool not in types
        if value is not None and (wrong or not isinstance(value, types)):
            kind = "true or false" if types == (bool,) else "a number"
            raise UserError(f"{config_path}: '{key}' must be {kind}, got {value!r}")
    return config


def check_adapter_weights(weights: dict, where: Path) -> dict:
    """Every tensor a LoRA/DoRA weight under a PEFT key, of the right rank, and finite: a NaN
    adapter (the run that wrote it diverged) would generate nothing but garbage."""
    for key, value in weights.items():
        try:
            _, name = split_key(key)
        except ValueError:
            name = None
        if name not in _NDIM:
            raise UserError(
                f"{where}: tensor {key!r} is not a LoRA/DoRA weight (PEFT names them "
                f"{PREFIX}<module>.lora_A.weight, .lora_B.weight, .lora_magnitude_vector)"
            )
        if value.ndim != _NDIM[name]:
            raise UserError(
                f"{where}: tensor {key!r} has {value.ndim} dimensions, not {_NDIM[name]}"
            )
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise UserError(
                f"{where}: tensor {key!r} holds NaN/inf values: the run that saved this adapter "
                "diverged; use an earlier checkpoint (checkpoints/step-*) or train again"
            )
    return weights


def load_adapter(adapter_dir: Path, fix: str | None = None) -> tuple:
    """(adapter_config, {peft key: np.ndarray}) from a PEFT-layout directory, every file
    checked: one line naming the file and what is wrong, never a crash in a loader.  `fix`:
    what to do about a damaged weights file, when the caller knows better (a checkpoint)."""
    from safetensors.numpy import load_file

    from mlxft.model_dir import check_safetensors

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / CONFIG_NAME
    weights_path = adapter_dir / WEIGHTS_NAME
    if not adapter_dir.is_dir():
        raise UserError(f"{adapter_dir}: adapter directory not found")
    if is_mlx_lm_adapter(adapter_dir):
        raise UserError(
            f"{adapter_dir}: this is an mlx-lm adapter; convert it with "
            f"`mlxft import {adapter_dir} --save-path DIR` and pass DIR"
        )
    if not config_path.is_file():
        if (adapter_dir / "config.json").is_file():
            raise UserError(
                f"{adapter_dir}: holds a full model (fine_tune_type full), not an adapter; "
                f"load it with --model {adapter_dir}"
            )
        raise UserError(f"{adapter_dir}: no {CONFIG_NAME}; is this an adapter directory?")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config_path}:{err.lineno}: invalid JSON ({err.msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"{config_path}: not UTF-8 text") from None
    _check_config(config_path, config)
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(
            f"{config_path}: peft_type {config.get('peft_type')} is not supported (LORA only)"
        )
    if not weights_path.is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise UserError(
                f"{adapter_dir}: adapter_model.bin is a pickle; save it as safetensors (PEFT: "
                f"safe_serialization=True)"
            )
        raise UserError(f"{adapter_dir}: no {WEIGHTS_NAME}")
    fix = fix or "the file is damaged; use a checkpoint (checkpoints/step-*) or train again"
    check_safetensors(weights_path, "adapter weights", fix)
    try:
        weights = load_file(str(weights_path))
    except Exception as err:  # safetensors' own error type, for what the header check missed
        reason = (str(err).splitlines() or [""])[0]
        raise UserError(
            f"{weights_path}: adapter weights file unreadable ({reason}); {fix}"
        ) from None
    return config, check_adapter_weights(weights, weights_path)
