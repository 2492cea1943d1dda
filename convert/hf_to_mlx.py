"""HF directory (or hub id) -> MLX directory, through mlx-lm's own loader and quantizer.

mlx-lm does the architecture work (`load_model` + the family's `sanitize`) and the
quantization (`quantize_model`); this module adds what `mlx_lm.convert` leaves out:
input checks with one-line errors, transformers-5 configs, pickle checkpoints on request,
and an atomic output directory.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path

from mlxft.errors import UserError
from mlxft.fileio import atomic_dir, check_destination
from mlxft.hub import resolve_model
from mlxft.mlx_backend.arrays import numpy_weights
from mlxft.model_dir import (
    check_dtype,
    copy_aux_files,
    read_model_config,
    set_config_dtype,
    weight_files,
    write_safetensors,
)

Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)


def check_quant_args(q_bits: int, q_group_size: int) -> None:
    if q_bits not in Q_BITS:
        raise UserError(
            f"--q-bits {q_bits}: not supported; use one of {', '.join(map(str, Q_BITS))}"
        )
    if q_group_size not in Q_GROUP_SIZES:
        sizes = ", ".join(map(str, Q_GROUP_SIZES))
        raise UserError(f"--q-group-size {q_group_size}: not supported; use one of {sizes}")


def mlx_config(src: Path) -> dict:
    """The source config as mlx-lm must read it.

    Besides `read_model_config`'s rope fix: mlx-lm's llama/qwen2 default to tied embeddings
    while transformers defaults to untied, so a config that omits `tie_word_embeddings`
    would silently lose lm_head. Decide it from the checkpoint: tied iff no lm_head stored.
    """
    config = read_model_config(src)
    if "tie_word_embeddings" not in config:
        config["tie_word_embeddings"] = "lm_head.weight" not in _weight_names(src)
    return config


def _weight_names(src: Path) -> set[str]:
    index = src / "model.safetensors.index.json"
    if index.is_file():  # checked by check_model_dir
        return set(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    names: set[str] = set()
    for f in weight_files(src):
        with safe_open(str(f), framework="numpy") as st:  # reads the header only
            names |= set(st.keys())
    return names


def _stage_pickle(src: Path, staging: Path) -> Path:
    """Re-save a pickle-only checkpoint (user passed --allow-pickle) as safetensors mlx-lm can
    load."""
    import torch
    from safetensors.torch import save_file

    state = {}
    for f in sorted(list(src.glob("*.bin")) + list(src.glob("*.pt")) + list(src.glob("*.pth"))):
        state.update(torch.load(f, map_location="cpu", weights_only=False))
    # clone: tied tensors share storage, which safetensors refuses
    save_file(
        {k: v.detach().contiguous().clone() for k, v in state.items()},
        str(staging / "model.safetensors"),
    )
    for f in src.glob("*.json"):
        if f.name != "pytorch_model.bin.index.json":
            (staging / f.name).write_bytes(f.read_bytes())
    return staging


def to_mlx(
    hf_path,
    mlx_path,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    dtype: str | None = None,
    revision: str | None = None,
    allow_pickle: bool = False,
) -> Path:
    """Convert a HF model to an MLX directory mlx-lm loads; returns the output path.

    `dtype` defaults to the config's (`dtype`/`torch_dtype`), else the stored dtype. Quantized
    directories record `quantization` (and mlx-lm's `quantization_config` copy) in config.json.
    """
    check_dtype(dtype)
    if quantize:
        check_quant_args(q_bits, q_group_size)
    check_destination(Path(mlx_path))
    src = resolve_model(str(hf_path), revision=revision, allow_pickle=allow_pickle)
    with tempfile.TemporaryDirectory() as staging:
        load_dir = src if weight_files(src) else _stage_pickle(src, Path(staging))
        model, config = _load(load_dir)
        dtype = dtype or config.get("dtype") or config.get("torch_dtype")
        if dtype in ("float16", "bfloat16", "float32"):
            _cast(model, getattr(mx, dtype))
            set_config_dtype(config, dtype)
        if quantize:
            from mlx_lm.utils import quantize_model

            model, config = quantize_model(model, config, q_group_size, q_bits)
        weights = numpy_weights(dict(tree_flatten(model.parameters())), "Converting")
        with atomic_dir(Path(mlx_path)) as tmp:
            write_safetensors(weights, tmp, "mlx")
            _save_config(config, tmp / "config.json")
            copy_aux_files(src, tmp)
    return Path(mlx_path)


def _load(path: Path):
    """mlx-lm model (lazy) + the config it was built from, minus keys load_config injects."""
    from mlx_lm.utils import load_model

    config = mlx_config(path)
    try:
        model, _ = load_model(path, lazy=True, model_config=config)
    except (
        ValueError,
        FileNotFoundError,
    ) as err:  # unknown model_type, weight/shape mismatch, no model*.safetensors
        raise UserError(
            f"{path}: mlx-lm cannot load this model ({str(err).splitlines()[0]})"
        ) from None
    return model, config


def _cast(model, dtype) -> None:
    """Cast floating parameters, keeping those a family pins (mlx-lm's `cast_predicate`)."""
    keep = getattr(model, "cast_predicate", lambda _: True)
    model.update(
        tree_map_with_path(
            lambda k, v: v.astype(dtype) if keep(k) and mx.issubdtype(v.dtype, mx.floating) else v,
            model.parameters(),
        )
    )


def _save_config(config: dict, path: Path) -> None:
    from mlx_lm.utils import save_config

    save_config(dict(config), path)
