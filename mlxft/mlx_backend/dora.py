"""DoRA for MLX, with PEFT 0.21's definition (`peft/tuners/lora/dora.py`), so a saved adapter
gives the same logits when PEFT loads it:

    W' = m / ||W + s B A||_row * (W + s B A)        (norm over the input dim, one per output row)

The norm is taken out of the gradient graph (DoRA paper, section 4.3; PEFT detaches it), so
only m, A and B get gradients.  With dropout active in training, PEFT applies the dropped-out
x to both the base and the LoRA path of the correction term and keeps the undropped base
output; we do the same so the two backends train alike.

Unlike PEFT we never build the dense (out, in) matrix W + s B A per step: expanding the square,

    ||W + s B A||²_row = ||W||²_row + 2 s <B_i, (A Wᵀ)ᵀ_i> + s² B_i (A Aᵀ) B_iᵀ

where ||W||²_row is fixed (W is frozen) and A Wᵀ is the base layer applied to the r rows of A.
So a quantized base (QDoRA) is never de-quantized after the start, and the extra work per
step is O(r · in · out) instead of O(in · out) memory.  Same value as PEFT's up to float
rounding (checked against PEFT's logits and gradients in tests/test_dora.py).
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
        # underscore: a constant, not a parameter (never trained, saved or given to the optimizer)
        self._base_norm_sq = mx.square(row_norm(dense_weight(base)))
        self.lora_magnitude_vector = self._weight_norm()
        mx.eval(self._base_norm_sq, self.lora_magnitude_vector)  # one layer's dense W at a time

    def _base_matmul(self, x: mx.array) -> mx.array:
        """x Wᵀ without the bias, through the base layer's own (maybe quantized) matmul."""
        y = self.base(x)
        return y - self.base["bias"] if "bias" in self.base else y

    def _weight_norm(self) -> mx.array:
        a, b, s = self.lora_A, self.lora_B, self.scale
        a_wt = self._base_matmul(a).astype(mx.float32)  # (r, out) = A Wᵀ
        cross = mx.sum(b * a_wt.T, axis=1)
        lora_sq = mx.sum((b @ (a @ a.T)) * b, axis=1)
        norm_sq = self._base_norm_sq + 2 * s * cross + s * s * lora_sq
        return mx.stop_gradient(mx.sqrt(mx.maximum(norm_sq, 0.0)))

    def __call__(self, x: mx.array) -> mx.array:
        """PEFT's y + (f - 1) * x Wᵀ + f * s * x Aᵀ Bᵀ (f = m / norm), grouped as
        y - x Wᵀ + f * (x Wᵀ + s x Aᵀ Bᵀ) so the backward pass keeps one activation per layer."""
        if self.disabled:
            return self.base(x)
        y = self.base(x)
        factor = (self.lora_magnitude_vector / self._weight_norm()).astype(x.dtype)
        if self.dropout is not None and self.training:
            x = self.dropout(x)
            base_out = self._base_matmul(x)
            rest = y - base_out
        else:
            rest = self.base["bias"] if "bias" in self.base else 0.0
            base_out = y - rest
        lora_out = (x @ self.lora_A.T.astype(x.dtype)) @ self.lora_B.T.astype(x.dtype)
        return rest + (factor * (base_out + self.scale * lora_out)).astype(y.dtype)

    def fused_weight(self) -> mx.array:
        """m / ||W + s B A||_row * (W + s B A), in float32 (PEFT's merge); the bias is unchanged."""
        merged = super().fused_weight()
        return (self.lora_magnitude_vector / row_norm(merged))[:, None] * merged
