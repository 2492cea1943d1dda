"""Choose the linear modules that get adapters and give them seeded initial weights.

Backends list their linear modules (path, shape); everything else happens here, so MLX and
torch start from bit-identical LoRA weights for the same seed.  Module paths are the
Hugging Face ones (mlx-lm keeps them), which is also what PEFT's key names are built from.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field

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


def block_index(path: str) -> int | None:
    match = _BLOCK.search(path)
    return int(match.group(1)) if match else None


def _matches(path: str, key: str) -> bool:
    return path == key or path.endswith("." + key)


def select_layers(num_blocks: int, num_layers: int) -> list:
    """The last `num_layers` blocks (-1: all), as mlx-lm does."""
    if num_layers == -1 or num_layers >= num_blocks:
        return list(range(num_blocks))
    return list(range(num_blocks - num_layers, num_blocks))


def full_layers(num_blocks: int, num_layers: int) -> tuple:
    """Full fine-tuning: (blocks whose weights train, whether everything else trains too).

    All blocks (num_layers -1 or >= the depth) trains the whole model, embeddings, final norm
    and lm_head included; a partial depth trains only the last blocks, so the embeddings
    (often tied to lm_head) stay as the base model has them."""
    layers = select_layers(num_blocks, num_layers)
    return layers, len(layers) == num_blocks


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
    """`select_targets`, then each target's seeded initial weights."""
    plan = select_targets(linears, num_blocks, cfg)
    for t in plan.targets:
        plan.init[t.path] = init_lora(t.path, t.in_features, t.out_features, plan.rank, cfg.seed)
    return plan


def select_targets(linears: list, num_blocks: int, cfg) -> AdapterPlan:
    """The plan without initial weights: targets from the backend's block-level linear modules
    per `num_layers` and `lora_parameters.keys` (what the memory planner needs)."""
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
                    f"lora_parameters.keys: no linear module matches '{key}'; this model has: "
                    f"{', '.join(names)}"
                )
    if not chosen:
        raise UserError("no linear modules to adapt: check num_layers and lora_parameters.keys")
    return AdapterPlan(
        kind=cfg.fine_tune_type,
        rank=cfg.lora_rank,
        scale=cfg.lora_scale,
        dropout=cfg.lora_dropout,
        targets=chosen,
        layers=sorted({block_index(t.path) for t in chosen}),
        num_blocks=num_blocks,
    )


def plan_from_adapter(
    linears: list, num_blocks: int, adapter_config: dict, weights: dict
) -> AdapterPlan:
    """The plan that reproduces a saved adapter on this model: targets from the weight keys,
    rank from the shapes, scale = lora_alpha / r (/ sqrt(r) for rsLoRA); init = the saved weights.

    Every mismatch names the first module that does not fit, so a wrong `--model` or a
    truncated file is one readable line instead of a shape error deep in a matmul."""
    from mlxft.adapters.files import split_key

    by_path = {info.path: info for info in linears}
    pairs: dict = {}
    for key in sorted(weights):
        path, name = split_key(key)
        if name not in ("lora_A", "lora_B", "lora_magnitude_vector"):
            raise UserError(
                f"adapter tensor {key}: {name} is not supported (LoRA/DoRA linear adapters only)"
            )
        pairs.setdefault(path, {})[name] = np.asarray(weights[key], dtype=np.float32)
    if not pairs:
        raise UserError("the adapter has no weights")
    for key in ("rank_pattern", "alpha_pattern"):
        if adapter_config.get(key):
            raise UserError(f"adapter_config.json: {key} (per-module ranks) is not supported")
    rank = None
    for path, found in pairs.items():
        if "lora_A" not in found or "lora_B" not in found:
            missing = "lora_A" if "lora_A" not in found else "lora_B"
            raise UserError(
                f"adapter module {path} has no {missing} weight; the adapter file is incomplete"
            )
        info = by_path.get(path)
        if info is None:
            names = sorted({p.split(f".{block_index(p)}.", 1)[-1] for p in by_path})
            raise UserError(
                f"adapter module {path} is not a linear module of this model (it has: "
                f"{', '.join(names)}); "
                "was the adapter trained on a different base model?"
            )
        r = found["lora_A"].shape[0]
        rank = r if rank is None else rank
        expected = {
            "lora_A": (rank, info.in_features),
            "lora_B": (info.out_features, rank),
            "lora_magnitude_vector": (info.out_features,),
        }
        for name, value in found.items():
            if tuple(value.shape) != expected[name]:
                raise UserError(
                    f"adapter module {path} {name} has shape {tuple(value.shape)}, "
                    f"the model expects {expected[name]}"
                )
    r = int(adapter_config.get("r", rank))
    if r != rank:
        raise UserError(f"adapter_config.json: r = {r}, but the weights have rank {rank}")
    alpha = float(adapter_config.get("lora_alpha", r))
    scale = alpha / np.sqrt(r) if adapter_config.get("use_rslora") else alpha / r
    targets = sorted((by_path[p] for p in pairs), key=lambda i: (block_index(i.path), i.path))
    plan = AdapterPlan(
        kind="dora" if adapter_config.get("use_dora") else "lora",
        rank=rank,
        scale=float(scale),
        dropout=float(adapter_config.get("lora_dropout") or 0.0),
        targets=targets,
        layers=sorted({block_index(t.path) for t in targets}),
        num_blocks=num_blocks,
    )
    for path, found in pairs.items():
        plan.init[path] = (found["lora_A"], found["lora_B"])
    return plan
