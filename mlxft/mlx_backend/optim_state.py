"""MLX optimizer state <-> the flat, backend-neutral layout checkpoints store.

MLX keeps `optimizer.state` as a tree mirroring the trainable parameters, with Adam's moments
named `m`/`v` and SGD's momentum `v`, plus a global `step`.  Checkpoints use torch's names under
each parameter's PEFT key (`K.exp_avg`, `K.exp_avg_sq`, `K.momentum_buffer`) and `step`, so a
checkpoint reads the same whichever backend wrote it (torch_backend/optim.py is the other half).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlxft.adapters.files import peft_key
from mlxft.errors import UserError

_ADAPTER_NAMES = ("lora_A", "lora_B", "lora_magnitude_vector")
_SLOTS = {"adam": {"m": "exp_avg", "v": "exp_avg_sq"}, "adamw": {"m": "exp_avg", "v": "exp_avg_sq"},
          "sgd": {"v": "momentum_buffer"}}


def param_key(path: str) -> str:
    """MLX parameter path -> PEFT key for adapter weights, the Hugging Face name otherwise (full)."""
    module, _, name = path.rpartition(".")
    return peft_key(module, name) if name in _ADAPTER_NAMES else path


def _slots(optimizer, kind: str) -> dict:
    if kind == "sgd" and not float(getattr(optimizer, "momentum", 0.0) or 0.0):
        return {}  # plain SGD keeps a `v` it never uses; torch keeps none
    return _SLOTS[kind]


def export_state(optimizer, kind: str) -> dict:
    out = {"step": np.array([int(optimizer.state["step"].item())], dtype=np.int64)}
    slots = _slots(optimizer, kind)
    for path, value in tree_flatten(optimizer.state):
        param, _, slot = path.rpartition(".")
        if param and slot in slots:
            out[f"{param_key(param)}.{slots[slot]}"] = np.array(value.astype(mx.float32))
    return out


def _set(tree, path: str, value) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    tree[leaf] = value


def import_state(optimizer, kind: str, trainable: dict, state: dict) -> None:
    """Fill `optimizer.state` in place (compiled steps hold a reference to that dict)."""
    if "step" not in state:
        raise UserError("optimizer state has no 'step'; it was not written by mlxft")
    optimizer.init(trainable)
    slots = _slots(optimizer, kind)
    steps = int(np.asarray(state["step"]).reshape(-1)[0])
    for path, current in tree_flatten(optimizer.state):
        param, _, slot = path.rpartition(".")
        if not param or slot not in slots:
            continue
        key = f"{param_key(param)}.{slots[slot]}"
        value = state.get(key)
        if value is None:
            if steps:
                raise UserError(f"optimizer state has no '{key}': it was saved for another adapter or optimizer "
                                f"({kind} now)")
            continue
        if tuple(value.shape) != tuple(current.shape):
            raise UserError(f"optimizer state '{key}' has shape {tuple(value.shape)}, expected {tuple(current.shape)}")
        _set(optimizer.state, path, mx.array(np.asarray(value)).astype(current.dtype))
    optimizer.state["step"] = mx.array(steps, dtype=mx.uint64)
    mx.eval(optimizer.state)
