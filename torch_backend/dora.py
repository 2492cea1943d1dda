"""DoRA for torch: the computation of `mlxft.mlx_backend.dora` (PEFT 0.21's DoRA), on torch tensors.

    W' = m / ||W + s B A||_row * (W + s B A)

The norm carries no gradient (DoRA paper, section 4.3, as PEFT) and is expanded as on MLX,
||W||²_row + 2 s <B_i, (A Wᵀ)ᵀ_i> + s² B_i (A Aᵀ) B_iᵀ, so no dense (out, in) matrix is built per
step; with dropout active in training, the dropped-out x feeds both the base and LoRA paths of
the correction term, as in PEFT.  `lora_magnitude_vector` (out,) starts at ||W||_row, float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlxft.torch_backend.lora import LoRALinear


class DoRALinear(LoRALinear):
    def __init__(self, base: nn.Linear, lora_a, lora_b, scale: float, dropout: float = 0.0):
        super().__init__(base, lora_a, lora_b, scale, dropout)
        with torch.no_grad():
            self.register_buffer(
                "base_norm_sq", base.weight.float().square().sum(dim=1), persistent=False
            )
        self.lora_magnitude_vector = nn.Parameter(self._weight_norm())

    @torch.no_grad()
    def _weight_norm(self) -> torch.Tensor:
        a, b, s = self.lora_A, self.lora_B, self.scale
        a_wt = F.linear(a.to(self.base.weight.dtype), self.base.weight).float()  # (r, out) = A Wᵀ
        cross = (b * a_wt.T).sum(dim=1)
        lora_sq = ((b @ (a @ a.T)) * b).sum(dim=1)
        return (self.base_norm_sq + 2 * s * cross + s * s * lora_sq).clamp_min(0).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """PEFT's y + (f - 1) x Wᵀ + f s x Aᵀ Bᵀ, grouped as on MLX: y - x Wᵀ + f (x Wᵀ + s x Aᵀ
        Bᵀ)."""
        if self.disabled:
            return self.base(x)
        y = self.base(x)
        factor = (self.lora_magnitude_vector / self._weight_norm()).to(x.dtype)
        if isinstance(self.dropout, nn.Dropout) and self.dropout.training:
            x = self.dropout(x)
            base_out = F.linear(x, self.base.weight)
            rest = y - base_out
        else:
            rest = self.base.bias if self.base.bias is not None else 0.0
            base_out = y - rest
        lora_out = (x @ self.lora_A.T.to(x.dtype)) @ self.lora_B.T.to(x.dtype)
        return rest + (factor * (base_out + self.scale * lora_out)).to(y.dtype)

    @torch.no_grad()
    def fused_weight(self) -> torch.Tensor:
        """m / ||W + s B A||_row * (W + s B A), in float32 (PEFT's merge); the bias is unchanged."""
        merged = super().fused_weight()
        return (self.lora_magnitude_vector / merged.norm(dim=1))[:, None] * merged
