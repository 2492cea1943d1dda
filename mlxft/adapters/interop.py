"""Adapters in mlx-lm's layout, to and from ours (PEFT's).

mlx-lm:  adapters.safetensors with `<module>.lora_a` (in, r) and `<module>.lora_b` (r, out)
         (DoRA adds `<module>.m`), adapter_config.json with `fine_tune_type`, `num_layers`
         (the LAST N blocks; -1 = all) and `lora_parameters` {rank, scale, dropout, keys}
         where keys are block-relative paths such as `self_attn.q_proj`.
PEFT:    adapter_model.safetensors with `base_model.model.<module>.lora_A.weight` (r, in),
         `lora_B.weight` (out, r), and `lora_alpha` = scale * r.
Both name modules by the same (Hugging Face) paths, so converting is a transpose per tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mlxft.adapters.files import (
    CONFIG_NAME,
    MLX_LM_WEIGHTS,
    adapter_config,
    is_mlx_lm_adapter,
    load_adapter,
    peft_key,
    save_adapter,
    split_key,
)
from mlxft.adapters.targets import LinearInfo, block_index, plan_from_adapter
from mlxft.errors import UserError

_TO_MLX = {"lora_A": "lora_a", "lora_B": "lora_b", "lora_magnitude_vector": "m"}
_FROM_MLX = {v: k for k, v in _TO_MLX.items()}


def _linears_from_weights(weights: dict) -> list:
    """LinearInfo per adapted module, read off the tensor shapes (when no model is at hand)."""
    shapes = {}
    for key, value in weights.items():
        path, name = split_key(key)
        if name == "lora_A":
            shapes.setdefault(path, [0, 0])[0] = value.shape[1]
        elif name == "lora_B":
            shapes.setdefault(path, [0, 0])[1] = value.shape[0]
    return [LinearInfo(p, fin, fout) for p, (fin, fout) in shapes.items()]


def model_num_blocks(model: str | None) -> int | None:
    """Transformer blocks of `model` (a directory or hub id) from its config.json alone, None
    when it cannot be read."""
    if not model:
        return None
    from mlxft.hub import model_config

    try:
        config = model_config(model)
    except (UserError, ValueError):
        return None
    value = config.get("num_hidden_layers", config.get("n_layer"))
    return int(value) if value else None


def _peft_config(plan, base_model: str, partial: bool) -> dict:
    config = adapter_config(plan, base_model)
    if partial:
        config["layers_to_transform"], config["layers_pattern"] = plan.layers, "layers"
    return config


# ---------------------------------------------------------------------------- PEFT -> mlx-lm
def to_mlx_lm(config: dict, weights: dict, num_blocks: int | None) -> tuple:
    """(mlx-lm adapter_config, {mlx-lm key: array}) for a PEFT adapter."""
    plan = plan_from_adapter(_linears_from_weights(weights), num_blocks or 0, config, weights)
    first = plan.layers[0]
    if first == 0:
        num_layers = -1
    elif num_blocks is None:
        raise UserError(
            f"the adapter starts at block {first}, and mlx-lm counts adapted blocks from the end: "
            "pass --model BASE so the number of blocks is known"
        )
    else:
        num_layers = num_blocks - first
    keys = sorted({t.path.split(f"layers.{block_index(t.path)}.", 1)[1] for t in plan.targets})
    mlx_config = {
        "model": config.get("base_model_name_or_path"),
        "fine_tune_type": plan.kind,
        "num_layers": num_layers,
        "lora_parameters": {
            "rank": plan.rank,
            "scale": plan.scale,
            "dropout": plan.dropout,
            "keys": keys,
        },
    }
    mlx_weights = {}
    for key, value in weights.items():
        path, name = split_key(key)
        value = np.asarray(value, dtype=np.float32)
        mlx_weights[f"{path}.{_TO_MLX[name]}"] = np.ascontiguousarray(
            value.T if value.ndim == 2 else value
        )
    return mlx_config, mlx_weights


# ---------------------------------------------------------------------------- mlx-lm -> PEFT
def from_mlx_lm(
    mlx_config: dict, mlx_weights: dict, num_blocks: int | None, where: str = "adapter"
) -> tuple:
    """(PEFT adapter_config, {PEFT key: array}) for an mlx-lm adapter."""
    kind = mlx_config.get("fine_tune_type", "lora")
    if kind == "full":
        raise UserError(
            f"{where}: a full fine-tune (fine_tune_type: full) holds model weights, not an "
            f"adapter; "
            "load it as a model instead"
        )
    params = mlx_config.get("lora_parameters")
    if not isinstance(params, dict) or "scale" not in params:
        raise UserError(
            f"{where}: adapter_config.json has no lora_parameters.scale; is this an mlx-lm adapter?"
        )
    weights = {}
    for key, value in mlx_weights.items():
        path, _, name = key.rpartition(".")
        if not path or name not in _FROM_MLX:
            raise UserError(f"{where}: tensor {key} is not a LoRA/DoRA weight (lora_a, lora_b, m)")
        value = np.asarray(value, dtype=np.float32)
        weights[peft_key(path, _FROM_MLX[name])] = np.ascontiguousarray(
            value.T if value.ndim == 2 else value
        )
    rank = next((v.shape[0] for k, v in weights.items() if k.endswith("lora_A.weight")), None)
    if rank is None:
        raise UserError(f"{where}: {MLX_LM_WEIGHTS} holds no lora_a weights")
    peft_like = {
        "r": rank,
        "lora_alpha": float(params["scale"]) * rank,
        "lora_dropout": params.get("dropout", 0.0),
        "use_dora": kind == "dora",
    }
    layers = sorted({block_index(split_key(k)[0]) for k in weights})
    plan = plan_from_adapter(
        _linears_from_weights(weights), num_blocks or layers[-1] + 1, peft_like, weights
    )
    base = mlx_config.get("model") or ""
    return _peft_config(plan, base, partial=layers[0] > 0 and num_blocks is None), weights


# ---------------------------------------------------------------------------- directories
def _write(save_path: Path, write) -> Path:
    from mlxft.fileio import atomic_dir

    with atomic_dir(Path(save_path)) as tmp:
        write(tmp)
    return Path(save_path)


def export_adapter(adapter_path, save_path, model: str | None = None) -> Path:
    """Our (PEFT-layout) adapter directory -> an mlx-lm adapter directory that
    `mlx_lm.load(adapter_path=)` reads."""
    from mlxft.fileio import save_safetensors, write_json

    config, weights = load_adapter(Path(adapter_path))
    num_blocks = model_num_blocks(model or config.get("base_model_name_or_path"))
    mlx_config, mlx_weights = to_mlx_lm(config, weights, num_blocks)

    def write(tmp: Path) -> None:
        save_safetensors(tmp / MLX_LM_WEIGHTS, mlx_weights, metadata={"format": "mlx"})
        write_json(tmp / CONFIG_NAME, mlx_config)

    return _write(save_path, write)


def read_mlx_lm(src: Path) -> tuple:
    """(adapter_config, weights) of an mlx-lm adapter directory, both files checked."""
    from safetensors.numpy import load_file

    from mlxft.model_dir import check_safetensors

    config_path = src / CONFIG_NAME
    if not config_path.is_file():
        raise UserError(f"{src}: has {MLX_LM_WEIGHTS} but no {CONFIG_NAME}; mlx-lm writes both")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config_path}:{err.lineno}: invalid JSON ({err.msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"{config_path}: not UTF-8 text") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: must be a JSON object, got {type(config).__name__}")
    path = src / MLX_LM_WEIGHTS
    check_safetensors(path, "adapter weights", "the file is damaged; export the adapter again")
    try:
        weights = load_file(str(path))
    except Exception as err:  # safetensors' own error type, for what the header check missed
        raise UserError(f"{path}: adapter weights file unreadable ({err})") from None
    bad = next((k for k, v in weights.items() if not np.isfinite(v).all()), None)
    if bad:
        raise UserError(
            f"{path}: tensor {bad!r} holds NaN/inf values: the run that saved it diverged"
        )
    return config, weights


def import_adapter(src, save_path, model: str | None = None) -> Path:
    """An mlx-lm or PEFT adapter directory -> our PEFT-layout directory (float32, normalised
    config)."""
    src = Path(src).expanduser()
    if not src.is_dir():
        raise UserError(f"{src}: adapter directory not found")
    if is_mlx_lm_adapter(src):
        mlx_config, mlx_weights = read_mlx_lm(src)
        num_blocks = model_num_blocks(model or mlx_config.get("model"))
        config, weights = from_mlx_lm(mlx_config, mlx_weights, num_blocks, where=str(src))
    else:
        source_config, weights = load_adapter(src)
        num_blocks = model_num_blocks(model or source_config.get("base_model_name_or_path"))
        layers = sorted({block_index(split_key(k)[0]) for k in weights})
        plan = plan_from_adapter(
            _linears_from_weights(weights), num_blocks or layers[-1] + 1, source_config, weights
        )
        partial = num_blocks is None and bool(source_config.get("layers_to_transform"))
        config = _peft_config(plan, source_config.get("base_model_name_or_path") or "", partial)
    return _write(save_path, lambda tmp: save_adapter(tmp, weights, config))
