"""`mlxft fuse`: fold an adapter into its base model and write a plain HF model directory.

Each adapted linear becomes W' = W + scale * B A (DoRA: rescaled per row by m / ||W + sBA||;
computed in float32, stored in the base weight's dtype), so the result runs in transformers,
mlx-lm or llama.cpp with no adapter code.  The merge itself is the backend's
(`Backend.fused_weights`); the directory is written atomically by `mlxft.model_dir.save_hf_dir`,
which also checks the tensor names against transformers' architecture before it appears.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlxft.errors import UserError
from mlxft.fileio import check_destination
from mlxft.inference.load import load_for_inference
from mlxft.model_dir import hf_config, save_hf_dir


def fuse(
    model: str,
    adapter_path: str,
    save_path: str,
    de_quantize: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
    backend: str = "mlx",
    device: str | None = None,
) -> Path:
    """Write base + adapter as one HF model directory at `save_path`; returns it."""
    check_destination(Path(save_path))
    loaded = load_for_inference(
        model,
        adapter_path,
        backend=backend,
        device=device,
        trust_remote_code=trust_remote_code,
        revision=revision,
        with_tokenizer=False,
    )
    if loaded.plan is None or not loaded.plan.targets:
        raise UserError("the adapter adapts no linear layer; nothing to fuse")
    if loaded.backend.quantized and not de_quantize:
        raise UserError(
            f"{model} is MLX-quantized, and the fused model is written as a transformers model, "
            "which cannot hold MLX-quantized weights; pass --de-quantize to write it de-quantized"
        )
    weights = loaded.backend.fused_weights()
    config = hf_config(json.loads((loaded.model_path / "config.json").read_text()))
    return save_hf_dir(weights, config, loaded.model_path, Path(save_path))
