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
from mlxft.fileio import save_safetensors, write_json

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
    path, name = body.rsplit(".", 1)
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


def save_adapter(out_dir: Path, weights: dict, config: dict) -> None:
    """weights: {peft key: np.ndarray}. Each file is written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in weights.items()}
    save_safetensors(out_dir / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    write_json(out_dir / CONFIG_NAME, config)


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

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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


def load_adapter(adapter_dir: Path) -> tuple:
    """(adapter_config, {peft key: np.ndarray}) from a PEFT-layout directory, with clear errors."""
    from safetensors.numpy import load_file

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
    return config, load_file(str(weights_path))
