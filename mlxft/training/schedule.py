"""Learning-rate schedules as plain functions of the optimizer step, shared by both backends.

Both backends receive the learning rate for each step from here, so warm-up and decay are
identical by construction (the parity tests rely on it).
"""

from __future__ import annotations

import math


def warmup_steps(schedule: dict, total_steps: int) -> int:
    if schedule.get("warmup"):
        return min(int(schedule["warmup"]), total_steps)
    return int(round(schedule.get("warmup_ratio", 0.0) * total_steps))


def learning_rate(step: int, base_lr: float, schedule: dict, total_steps: int) -> float:
    """LR used for optimizer step `step` (0-based): linear warm-up, then constant/linear/cosine
    decay
    to `min_lr_ratio * base_lr` at the last step."""
    warm = warmup_steps(schedule, total_steps)
    if step < warm:
        init = schedule.get("warmup_init", 0.0)
        return init + (base_lr - init) * (step + 1) / warm
    name = schedule.get("name", "constant")
    if name == "constant":
        return base_lr
    floor = base_lr * schedule.get("min_lr_ratio", 0.0)
    span = max(1, total_steps - warm - 1)
    progress = min(1.0, (step - warm) / span)
    if name == "linear":
        return floor + (base_lr - floor) * (1.0 - progress)
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
