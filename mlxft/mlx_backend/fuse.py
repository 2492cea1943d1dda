"""Fusing on MLX: every LoRA/DoRA layer replaced by a plain Linear holding its own merge.

Each layer computes its merged weight (`fused_weight`, the layer owns its fusing); this module
only swaps modules and hands back numpy weights under their Hugging Face names, de-quantized,
in the base's dtype (`fused_weights`), or the same weights one at a time, on demand
(`fused_tensors`, for exports that stream them into a file).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlxft.mlx_backend.arrays import numpy_weights
from mlxft.mlx_backend.lora import QUANTIZED, LoRALinear, dense_weight, linear_shape


def _float32(array: mx.array) -> np.ndarray:
    return np.array(array.astype(mx.float32))


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
    if any(isinstance(m, QUANTIZED) for _, m in model.named_modules()):
        model = dequantize_model(model)
    return numpy_weights(dict(tree_flatten(model.parameters())), "Fusing")


def fused_tensors(model: nn.Module) -> list:
    """[(HF name, numpy shape, load)] of `model` as `fused_weights` would return it, in the
    model's parameter order, where `load()` computes that one tensor (adapter merged,
    de-quantized, float32) only when called.  The model is left as it is: a writer that loads,
    writes and drops each tensor in turn never holds a second copy of the model."""
    modules = dict(model.named_modules())
    adapted = {p for p, m in modules.items() if isinstance(m, LoRALinear)}
    # A module's own entries replace its parameters; the outermost owner wins, so a quantized
    # base under a LoRA (QLoRA) is merged by the LoRA layer, not de-quantized on its own.
    owners = {}
    for path in adapted:
        layer = modules[path]
        fin, fout = linear_shape(layer.base)
        owners[path] = [(f"{path}.weight", (fout, fin), lambda m=layer: _float32(m.fused_weight()))]
        if "bias" in layer.base:
            owners[path].append(_entry(f"{path}.bias", layer.base.bias))
    for path, module in modules.items():
        if isinstance(module, QUANTIZED) and not any(path.startswith(a + ".") for a in adapted):
            rows, packed = module.weight.shape
            shape = (rows, packed * 32 // module.bits)
            owners[path] = [(f"{path}.weight", shape, lambda m=module: _float32(dense_weight(m)))]
            if "bias" in module:
                owners[path].append(_entry(f"{path}.bias", module.bias))
    out, done = [], set()
    for name, value in tree_flatten(model.parameters()):
        parts = name.split(".")
        owner = next(
            (p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in owners), None
        )
        if owner is None:
            out.append(_entry(name, value))
        elif owner not in done:
            done.add(owner)
            out.extend(owners[owner])
    return out


def _entry(name: str, value: mx.array) -> tuple:
    return name, tuple(value.shape), lambda v=value: _float32(v)
