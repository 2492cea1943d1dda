"""LoRA / DoRA layers for MLX, storing weights in PEFT's layout (A: (r, in), B: (out, r)).

Keeping PEFT's orientation means saving and loading is a rename, never a transpose, and
the torch backend holds the very same arrays.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def linear_shape(layer) -> tuple:
    """(in_features, out_features) of a Linear or QuantizedLinear."""
    out_features, packed = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        return packed * 32 // layer.bits, out_features
    return packed, out_features


QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def dense_weight(layer) -> mx.array:
    """The weight of a Linear (out, in) or Embedding (vocab, dims), de-quantized for their
    quantized forms."""
    if isinstance(layer, QUANTIZED):
        return mx.dequantize(
            layer.weight,
            layer.scales,
            layer.get("biases"),
            layer.group_size,
            layer.bits,
            mode=getattr(layer, "mode", "affine"),
        )
    return layer.weight


class LoRALinear(nn.Module):
    """y = base(x) + scale * dropout(x) A^T B^T, base frozen (it may be quantized: QLoRA)."""

    def __init__(self, base: nn.Module, lora_a, lora_b, scale: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.lora_A = mx.array(lora_a, dtype=mx.float32)
        self.lora_B = mx.array(lora_b, dtype=mx.float32)
        self.scale = float(scale)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else None

    def delta(self, x: mx.array) -> mx.array:
        if self.dropout is not None:
            x = self.dropout(x)
        return self.scale * ((x @ self.lora_A.T.astype(x.dtype)) @ self.lora_B.T.astype(x.dtype))

    # True while the preference reference runs (mlxft.mlx_backend.preference.adapters_off): the
    # layer is its base alone, so the reference model needs no second copy of the weights.
    disabled = False

    def __call__(self, x: mx.array) -> mx.array:
        if self.disabled:
            return self.base(x)
        y = self.base(x)
        return y + self.delta(x).astype(y.dtype)

    def fused_weight(self) -> mx.array:
        """W + scale * B A, in float32 (for `mlxft fuse`)."""
        w = dense_weight(self.base).astype(mx.float32)
        return w + self.scale * (self.lora_B @ self.lora_A)
