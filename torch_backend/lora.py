"""LoRA for torch, the same math and layout as `mlxft.mlx_backend.lora` (and PEFT's file layout).

A: (r, in), B: (out, r), y = base(x) + scale * dropout(x) A^T B^T.  The adapter weights stay
float32; like the MLX layer they are cast to the activation dtype for the product and the
delta is cast back to the base output's dtype, so no op ever mixes dtypes.  Our own module
rather than PEFT's keeps the product free of PEFT and the initial weights under our control
(`plan.init`), so both backends start bit-identical.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class LoRALinear(nn.Module):
    def __init__(
        self,
        base: nn.Linear,
        lora_a: np.ndarray,
        lora_b: np.ndarray,
        scale: float,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.base = base
        device = base.weight.device
        self.lora_A = nn.Parameter(
            torch.tensor(np.asarray(lora_a), dtype=torch.float32, device=device)
        )
        self.lora_B = nn.Parameter(
            torch.tensor(np.asarray(lora_b), dtype=torch.float32, device=device)
        )
        self.scale = float(scale)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        return self.scale * ((x @ self.lora_A.T.to(x.dtype)) @ self.lora_B.T.to(x.dtype))

    # True while the preference reference runs (mlxft.torch_backend.preference.adapters_off): the
    # layer is its base alone, so the reference model needs no second copy of the weights.
    disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base(x)
        # The adapter path first: when a checkpointed block is recomputed, torch stops as soon as
        # every tensor the backward needs is back, and the base output of the block's last linear
        # (the MLP's down projection) is not one of them, so its matmul is skipped.  Same sum,
        # same bits.
        delta = self.delta(x)
        y = self.base(x)
        return y + delta.to(y.dtype)

    @torch.no_grad()
    def fused_weight(self) -> torch.Tensor:
        """W + scale * B A, in float32 (for fusing); the bias is unchanged."""
        return self.base.weight.float() + self.scale * (self.lora_B @ self.lora_A)
