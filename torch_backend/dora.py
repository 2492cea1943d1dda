"""DoRA for torch: the math of `mlxft.mlx_backend.dora` (which is PEFT 0.21's), on torch tensors.

    W' = m / ||W + s B A||_row * (W + s B A)

The norm is computed without gradient (DoRA paper, section 4.3, as PEFT does); with dropout
active in training, the dropped-out x feeds both the base and LoRA paths of the correction
term, as in PEFT.  `lora_magnitude_vector` (out,) starts at ||W||_row (B = 0) in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch_backend.lora import LoRALinear


class DoRALinear(LoRALinear):
    def __init__(self, base: nn.Linear, lora_a, lora_b, scale: float, dropout: float = 0.0):
        super().__init__(base, lora_a, lora_b, scale, dropout)
        self.lora_magnitude_vector = nn.Parameter(self._weight_norm())

    @torch.no_grad()
    def _weight_norm(self) -> torch.Tensor:
        w = self.base.weight.float() + self.scale * (self.lora_B @ self.lora_A)
        return torch.linalg.norm(w, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        factor = (self.lora_magnitude_vector / self._weight_norm()).to(x.dtype)
        if isinstance(self.dropout, nn.Dropout) and self.dropout.training:
            x = self.dropout(x)
            base_out = F.linear(x, self.base.weight.to(x.dtype))
        else:
            base_out = y - self.base.bias if self.base.bias is not None else y
        lora_out = (x @ self.lora_A.T.to(x.dtype)) @ self.lora_B.T.to(x.dtype)
        return y + ((factor - 1) * base_out + factor * self.scale * lora_out).to(y.dtype)
