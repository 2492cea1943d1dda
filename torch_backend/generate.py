"""Token-by-token generation on torch with a transformers KV cache (the MLX side: `KVGeneration`).

The cache lives here, between `start` (prefill the prompt) and `step` (one token), so the
neutral sampler in `mlxft.inference.sampling` only ever sees float32 logits of the last position.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch


class KVGeneration:
    def __init__(self, model, device: torch.device):
        self.model, self.device, self.cache = model, device, None
        args = set(inspect.signature(model.forward).parameters)
        # transformers 5.x renamed `past_key_values` to `cache`; older and remote-code models keep
        # the old name
        self.cache_arg = "cache" if "cache" in args else "past_key_values"
        self.extra = (
            {"logits_to_keep": 1} if "logits_to_keep" in args else {}
        )  # only the last position's logits

    @torch.no_grad()
    def _forward(self, ids: list) -> np.ndarray:
        inputs = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(
            input_ids=inputs, use_cache=True, **{self.cache_arg: self.cache}, **self.extra
        )
        self.cache = out[self.cache_arg] if self.cache_arg in out else out.past_key_values
        return out.logits[0, -1].float().cpu().numpy()

    def start(self, prompt_ids: list) -> np.ndarray:
        self.cache = None
        return self._forward([int(t) for t in prompt_ids])

    def step(self, token_id: int) -> np.ndarray:
        if self.cache is None:
            raise RuntimeError("next_logits before start_generation")
        return self._forward([int(token_id)])


class BatchKVGeneration:
    """Several sequences at once (greedy evaluation): prompts left-padded, an attention mask over
    the padding and position ids counted from each row's first real token."""

    def __init__(self, model, device: torch.device, prompts: list):
        self.model, self.device = model, device
        args = set(inspect.signature(model.forward).parameters)
        self.cache_arg = "cache" if "cache" in args else "past_key_values"
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in args else {}
        width = max(len(p) for p in prompts)
        self.ids = torch.tensor(
            [[0] * (width - len(p)) + [int(t) for t in p] for p in prompts], device=device
        )
        self.mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device
        )
        self.cache = None

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor) -> np.ndarray:
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        out = self.model(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_arg: self.cache},
            **self.extra,
        )
        self.cache = out[self.cache_arg] if self.cache_arg in out else out.past_key_values
        return out.logits[:, -1].float().cpu().numpy()

    def start(self) -> np.ndarray:
        return self._forward(self.ids)

    def step(self, token_ids: list) -> np.ndarray:
        ones = torch.ones((self.mask.shape[0], 1), dtype=self.mask.dtype, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        return self._forward(torch.tensor([[int(t)] for t in token_ids], device=self.device))
