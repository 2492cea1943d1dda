"""Fusing on MLX: every LoRA/DoRA layer replaced by a plain Linear holding its own merge.

Each layer computes its merged weight (`fused_weight`, the layer owns its fusing); this module
only swaps modules and hands back numpy weights under their Hugging Face names, de-quantized,
in the base's dtype.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxft.mlx_backend.arrays import numpy_weights
from mlxft.mlx_backend.lora import LoRALinear, linear_shape


def merge_adapters(model: nn.Module) -> int:
    """Replace every LoRALinear (and DoRALinear) of `model` by its merged Linear; returns how
    many."""
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
    if merged:
        model.update_modules(tree_unflatten(merged))
    return len(merged)


def fused_weights(model: nn.Module) -> dict:
    """{HF name: numpy tensor} of `model` with its adapters merged and every weight dense."""
    from mlx_lm.utils import dequantize_model

    merge_adapters(model)
    if any(
        isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()
    ):
        model = dequantize_model(model)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    return numpy_weights(weights)
