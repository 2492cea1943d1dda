"""DoRA for MLX, computed exactly as PEFT 0.21 does (`peft/tuners/lora/dora.py`), so a saved
adapter gives the same logits when PEFT loads it.

    W' = m / ||W + s B A||_row * (W + s B A)        (norm over the input dim, one per output row)

The norm is taken out of the gradient graph (DoRA paper, section 4.3; PEFT detaches it), so
only m, A and B get gradients.  With dropout active in training, PEFT applies the dropped-out
x to both the base and the LoRA path of the correction term and keeps the undropped base
output; we do the same so the two backends train alike.
"""

from __future__ import annotations

import mlx.core as mx

from mlxft.mlx_backend.lora import LoRALinear, dense_weight


def row_norm(w: mx.array) -> mx.array:
    """L2 norm of each output row of an (out, in) weight, in float32."""
    w = w.astype(mx.float32)
    return mx.sqrt(mx.sum(w * w, axis=1))


class DoRALinear(LoRALinear):
    """LoRALinear plus a trainable magnitude `lora_magnitude_vector` (out,), PEFT's name and layout.

    The magnitude starts as ||W + s B A||_row of the (de-quantized, for QLoRA) base weight, i.e.
    ||W||_row when B = 0, so the untrained layer equals its base."""

    def __init__(self, base, lora_a, lora_b, scale: float, dropout: float = 0.0):
        super().__init__(base, lora_a, lora_b, scale, dropout)
        self.lora_magnitude_vector = self._weight_norm()

    def _weight_norm(self) -> mx.array:
        w = dense_weight(self.base).astype(mx.float32)
        return mx.stop_gradient(row_norm(w + self.scale * (self.lora_B @ self.lora_A)))

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        factor = (self.lora_magnitude_vector / self._weight_norm()).astype(x.dtype)
        bias = self.base.get("bias")
        if self.dropout is not None and self.training:
            x = self.dropout(x)
            base_out = x @ dense_weight(self.base).T.astype(x.dtype)
        else:
            base_out = y - bias if bias is not None else y
        lora_out = (x @ self.lora_A.T.astype(x.dtype)) @ self.lora_B.T.astype(x.dtype)
        return y + ((factor - 1) * base_out + factor * self.scale * lora_out).astype(y.dtype)

    def fused_weight(self) -> mx.array:
        """m / ||W + s B A||_row * (W + s B A), in float32 (PEFT's merge); the bias is unchanged."""
        merged = super().fused_weight()
        return (self.lora_magnitude_vector / row_norm(merged))[:, None] * merged
