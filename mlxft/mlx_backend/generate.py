"""Incremental forward passes for generation: mlx-lm's KV cache, prompt prefilled in chunks.

The backend only turns token ids into last-position logits; sampling, stopping and
detokenizing live in `mlxft.inference.sampling`, shared with the torch backend.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

PREFILL_CHUNK = 512  # tokens per prefill pass: bounds the attention matrix for long prompts


class KVGeneration:
    """One sequence being generated: the model, its cache, and the last logits."""

    def __init__(self, model):
        from mlx_lm.models.cache import make_prompt_cache

        self.model = model
        self.cache = make_prompt_cache(model)

    def _forward(self, ids: list) -> mx.array:
        return self.model(mx.array([ids]), cache=self.cache)[0, -1].astype(mx.float32)

    def start(self, prompt_ids: list) -> np.ndarray:
        ids = [int(t) for t in prompt_ids]
        while len(ids) > PREFILL_CHUNK:
            self.model(mx.array([ids[:PREFILL_CHUNK]]), cache=self.cache)
            mx.eval([c.state for c in self.cache])
            ids = ids[PREFILL_CHUNK:]
        return np.array(self._forward(ids))

    def step(self, token_id: int) -> np.ndarray:
        return np.array(self._forward([int(token_id)]))


class BatchKVGeneration:
    """Several sequences at once (greedy evaluation): prompts left-padded, mlx-lm's BatchKVCache
    masks the padding and gives each row its own RoPE offset."""

    def __init__(self, model, prompts: list):
        from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

        layers = make_prompt_cache(model)
        if any(type(c) is not KVCache for c in layers):  # sliding-window, recurrent: one at a time
            raise NotImplementedError("this model's cache has no batched form here")
        self.model = model
        width = max(len(p) for p in prompts)
        self.rows = [[0] * (width - len(p)) + [int(t) for t in p] for p in prompts]
        self.cache = [BatchKVCache([width - len(p) for p in prompts]) for _ in layers]

    def _forward(self, tokens: mx.array) -> np.ndarray:
        return np.array(self.model(tokens, cache=self.cache)[:, -1].astype(mx.float32))

    def start(self) -> np.ndarray:
        ids = mx.array(self.rows)
        while ids.shape[1] > PREFILL_CHUNK:
            self.model(ids[:, :PREFILL_CHUNK], cache=self.cache)
            mx.eval([c.state for c in self.cache])
            ids = ids[:, PREFILL_CHUNK:]
        return self._forward(ids)

    def step(self, token_ids: list) -> np.ndarray:
        return self._forward(mx.array([[int(t)] for t in token_ids]))
