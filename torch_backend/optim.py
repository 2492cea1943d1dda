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

from mlxft.errors import UserError

_OPTIONS = {"adamw": ("betas", "eps", "bias_correction"), "adam": ("betas", "eps", "bias_correction"),
            "sgd": ("momentum", "dampening", "nesterov")}
_STATE = {"adamw": ("exp_avg", "exp_avg_sq"), "adam": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}


def make_optimizer(cfg, params: list) -> torch.optim.Optimizer:
    name = cfg.optimizer
    extra = dict(cfg.optimizer_config.get(name, {}) or {})
    for key in extra:
        if key not in _OPTIONS[name]:
            raise UserError(f"optimizer_config.{name}.{key}: not an option of {name} (options: {', '.join(_OPTIONS[name])})")
    if extra.pop("bias_correction", True) is not True:
        raise UserError(f"optimizer_config.{name}.bias_correction: the torch backend always bias-corrects; remove the key")
    if "betas" in extra:
        extra["betas"] = tuple(float(b) for b in extra["betas"])
    lr = cfg.learning_rate
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, **extra)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, **extra)
    return torch.optim.SGD(params, lr=lr, weight_decay=cfg.weight_decay, **extra)


def optimizer_state(optimizer: torch.optim.Optimizer, named: list, kind: str, steps: int) -> dict:
    """{K.exp_avg: ..., step: ...} for `named` = [(PEFT key, parameter)]."""
    out = {"step": np.array([steps], dtype=np.int64)}
    for key, param in named:
        state = optimizer.state.get(param, {})
        for name in _STATE[kind]:
            value = state.get(name)
            if value is not None:
                out[f"{key}.{name}"] = value.detach().to("cpu", torch.float32).numpy().copy()  # a snapshot, not a view
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, named: list, kind: str, state: dict) -> int:
    """Restore what `optimizer_state` wrote; returns the step count."""
    if "step" not in state:
        raise UserError("optimizer state has no 'step'; it was not written by mlxft")
    steps = int(np.asarray(state["step"]).reshape(-1)[0])
    momentum = kind != "sgd" or optimizer.defaults.get("momentum", 0)
    for key, param in named:
        restored = {}
        for name in _STATE[kind]:
            value = state.get(f"{key}.{name}")
            if value is None:
                if steps and momentum:
                    raise UserError(
                        f"optimizer state has no '{key}.{name}': it was saved for another adapter or optimizer ({kind} now)"
                    )
                continue
            if tuple(value.shape) != tuple(param.shape):
                raise UserError(f"optimizer state '{key}.{name}' has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
            restored[name] = torch.tensor(np.asarray(value), dtype=param.dtype, device=param.device)
        if kind != "sgd" and restored:
            restored["step"] = torch.tensor(float(steps))
        if restored:
            optimizer.state[param] = restored
        else:
            optimizer.state.pop(param, None)
    return steps
