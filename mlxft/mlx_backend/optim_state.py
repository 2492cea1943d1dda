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

from mlxft.adapters.files import ADAPTER_TENSORS, peft_key
from mlxft.training.checkpoint import OPTIMIZER_SLOTS, optimizer_slot, optimizer_steps

_MLX_NAMES = {
    "adam": ("m", "v"),
    "adamw": ("m", "v"),
    "sgd": ("v",),
}  # MLX's names for OPTIMIZER_SLOTS


def param_key(path: str) -> str:
    """MLX parameter path -> PEFT key for adapter weights, the Hugging Face name otherwise
    (full)."""
    module, _, name = path.rpartition(".")
    return peft_key(module, name) if name in ADAPTER_TENSORS else path


def _slots(optimizer, kind: str) -> dict:
    if kind == "sgd" and not float(getattr(optimizer, "momentum", 0.0) or 0.0):
        return {}  # plain SGD keeps a `v` it never uses; torch keeps none
    return dict(zip(_MLX_NAMES[kind], OPTIMIZER_SLOTS[kind]))


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
    steps = optimizer_steps(state)
    optimizer.init(trainable)
    slots = _slots(optimizer, kind)
    for path, current in tree_flatten(optimizer.state):
        param, _, slot = path.rpartition(".")
        if param and slot in slots:
            value = optimizer_slot(
                state, f"{param_key(param)}.{slots[slot]}", current.shape, bool(steps), kind
            )
            if value is not None:
                _set(optimizer.state, path, mx.array(value).astype(current.dtype))
    optimizer.state["step"] = mx.array(steps, dtype=mx.uint64)
    mx.eval(optimizer.state)
