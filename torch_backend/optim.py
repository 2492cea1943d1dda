"""Optimizers with the MLX backend's semantics, and their state as flat numpy dicts for resuming.

MLX runs Adam/AdamW with `bias_correction=True`, decoupled weight decay `p *= 1 - lr*wd`
and eps outside the square root: exactly torch's Adam/AdamW.  SGD matches for the options
both share (momentum, dampening, nesterov, coupled weight decay).

State layout (shared with the MLX backend so checkpoints read the same): for each trainable
parameter's PEFT key K, `K.exp_avg` and `K.exp_avg_sq` (Adam/AdamW) or `K.momentum_buffer`
(SGD with momentum), plus `step`.
"""

from __future__ import annotations

import numpy as np
import torch

from mlxft.training.checkpoint import OPTIMIZER_SLOTS, optimizer_slot, optimizer_steps


def make_optimizer(cfg, params: list) -> torch.optim.Optimizer:
    """torch's optimizer for `cfg`, with the options `mlxft.config` validated."""
    extra = cfg.optimizer_options
    lr = cfg.learning_rate
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, **extra)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, **extra)
    return torch.optim.SGD(params, lr=lr, weight_decay=cfg.weight_decay, **extra)


def optimizer_state(optimizer: torch.optim.Optimizer, named: list, kind: str, steps: int) -> dict:
    """{K.exp_avg: ..., step: ...} for `named` = [(PEFT key, parameter)]."""
    out = {"step": np.array([steps], dtype=np.int64)}
    for key, param in named:
        state = optimizer.state.get(param, {})
        for name in OPTIMIZER_SLOTS[kind]:
            value = state.get(name)
            if value is not None:
                out[f"{key}.{name}"] = (
                    value.detach().to("cpu", torch.float32).numpy().copy()
                )  # a snapshot, not a view
    return out


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, named: list, kind: str, state: dict
) -> int:
    """Restore what `optimizer_state` wrote; returns the step count."""
    steps = optimizer_steps(state)
    momentum = kind != "sgd" or optimizer.defaults.get("momentum", 0)
    for key, param in named:
        restored = {}
        for name in OPTIMIZER_SLOTS[kind]:
            value = optimizer_slot(
                state, f"{key}.{name}", param.shape, bool(steps and momentum), kind
            )
            if value is not None:
                restored[name] = torch.tensor(value, dtype=param.dtype, device=param.device)
        if kind != "sgd" and restored:
            restored["step"] = torch.tensor(float(steps))
        if restored:
            optimizer.state[param] = restored
        else:
            optimizer.state.pop(param, None)
    return steps
