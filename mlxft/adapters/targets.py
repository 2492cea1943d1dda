"""Choose the linear modules that get adapters and give them seeded initial weights.

Backends list their linear modules (path, shape); everything else happens here, so MLX and
torch start from bit-identical LoRA weights for the same seed.  Module paths are the
Hugging Face ones (mlx-lm keeps them), which is also what PEFT's key names are built from.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from mlxft.errors import UserError

_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class LinearInfo:
    path: str  # e.g. "model.layers.3.self_attn.q_proj"
    in_features: int
    out_features: int


@dataclass
class AdapterPlan:
    kind: str  # lora | dora
    rank: int
    scale: float
    dropout: float
    targets: list  # [LinearInfo]
    layers: list  # block indices that carry adapters
    num_blocks: int
    init: dict = field(default_factory=dict)  # path -> (A (r, in), B (out, r)) float32

    @property
    def module_names(self) -> list:
        """PEFT's `target_modules`: the distinct last path components."""
        return sorted({t.path.rsplit(".", 1)[-1] for t in self.targets})


def block_index(path: str) -> Optional[int]:
    match = _BLOCK.search(path)
    return int(match.group(1)) if match else None


def _matches(path: str, key: str) -> bool:
    return path == key or path.endswith("." + key)


def select_layers(num_blocks: int, num_layers: int) -> list:
    """The last `num_layers` blocks (-1: all), as mlx-lm does."""
    if num_layers == -1 or num_layers >= num_blocks:
        return list(range(num_blocks))
    return list(range(num_blocks - num_layers, num_blocks))


def init_lora(path: str, in_features: int, out_features: int, rank: int, seed: int):
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform with a=sqrt(5)), B = 0.

    The generator is keyed by (seed, module path), so a module's init does not depend on
    which other modules are adapted or in what order backends visit them."""
    rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
    bound = 1.0 / np.sqrt(in_features)
    a = rng.uniform(-bound, bound, size=(rank, in_features)).astype(np.float32)
    b = np.zeros((out_features, rank), dtype=np.float32)
    return a, b


def plan_adapters(linears: list, num_blocks: int, cfg) -> AdapterPlan:
    """Pick targets from the backend's block-level linear modules per `num_layers` and `lora_parameters.keys`."""
    layers = select_layers(num_blocks, cfg.num_layers)
    keys = cfg.lora_keys
    chosen = []
    for info in linears:
        block = block_index(info.path)
        if block is None or block not in layers:
            continue
        if keys is None or any(_matches(info.path, k) for k in keys):
            chosen.append(info)
    if keys is not None:
        in_layers = [i for i in linears if block_index(i.path) in layers]
        for key in keys:
            if not any(_matches(i.path, key) for i in in_layers):
                names = sorted({i.path.split(f".{block_index(i.path)}.", 1)[-1] for i in in_layers})
                raise UserError(
                    f"lora_parameters.keys: no linear module matches '{key}'; this model has: {', '.join(names)}"
                )
    if not chosen:
        raise UserError("no linear modules to adapt: check num_layers and lora_parameters.keys")
    plan = AdapterPlan(
        kind=cfg.fine_tune_type,
        rank=cfg.lora_rank,
        scale=cfg.lora_scale,
        dropout=cfg.lora_dropout,
        targets=chosen,
        layers=sorted({block_index(t.path) for t in chosen}),
        num_blocks=num_blocks,
    )
    for t in chosen:
        plan.init[t.path] = init_lora(t.path, t.in_features, t.out_features, plan.rank, cfg.seed)
    return plan
