"""`mlxft fuse`: fold a LoRA adapter into its base model and write a plain HF model directory.

Each adapted linear becomes W' = W + scale * B A (DoRA: rescaled per row by m / ||W + sBA||;
computed in float32, stored in the base weight's dtype), so the result runs in transformers,
mlx-lm or llama.cpp with no adapter code.  The output is written atomically by `convert.save_hf_dir`, which also checks the
tensor names against transformers' architecture before the directory appears.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxft.errors import UserError
from mlxft.mlx_backend.lora import LoRALinear, linear_shape


def fused_weights(model: nn.Module, dequantize: bool) -> dict:
    """{HF name: mx.array} of `model` with every LoRALinear (and DoRALinear) merged into a plain Linear."""
    merged = []
    for path, layer in model.named_modules():
        if not isinstance(layer, LoRALinear):
            continue
        base = layer.base
        fin, fout = linear_shape(base)
        dtype = base.scales.dtype if isinstance(base, nn.QuantizedLinear) else base.weight.dtype
        linear = nn.Linear(fin, fout, bias="bias" in base)
        linear.weight = layer.fused_weight().astype(dtype)
        if "bias" in base:
            linear.bias = base.bias
        merged.append((path, linear))
    if not merged:
        raise UserError("the adapter adapts no linear layer; nothing to fuse")
    model.update_modules(tree_unflatten(merged))
    if dequantize:
        from mlx_lm.utils import dequantize_model

        model = dequantize_model(model)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    return weights


def fuse(model: str, adapter_path: str, save_path: str, de_quantize: bool = False,
         trust_remote_code: bool = False, revision: Optional[str] = None) -> Path:
    """Write base + adapter as one HF model directory at `save_path`; returns it."""
    from convert.files import check_destination, save_hf_dir
    from convert.mlx_to_hf import hf_config
    from mlxft.inference import load_for_inference

    check_destination(Path(save_path))
    loaded = load_for_inference(model, adapter_path, backend="mlx", trust_remote_code=trust_remote_code,
                                revision=revision, with_tokenizer=False)
    if loaded.backend.quantized and not de_quantize:
        raise UserError(f"{model} is MLX-quantized, and the fused model is written as a transformers model, "
                        "which cannot hold MLX-quantized weights; pass --de-quantize to write it de-quantized")
    weights = fused_weights(loaded.backend.model, dequantize=de_quantize)
    config = hf_config(json.loads((loaded.model_path / "config.json").read_text()))
    return save_hf_dir(weights, config, loaded.model_path, Path(save_path))
