"""What the machine offers a training run: the memory budget the planner compares against.

Metal's recommended working set on Apple silicon (asked of MLX only for MLX runs: a torch run
must not import MLX), physical RAM elsewhere.
"""

from __future__ import annotations

import os
import subprocess
import sys


def _metal_working_set() -> int:
    """Metal's recommended working set in bytes; 0 without MLX or a Metal device."""
    try:
        import mlx.core as mx

        if mx.metal.is_available():
            return int(mx.metal.device_info().get("max_recommended_working_set_size", 0))
    except Exception:  # noqa: BLE001 - mlx missing or no device info: fall back to RAM
        pass
    return 0


def machine_memory(backend: str = "mlx") -> tuple:
    """(bytes usable for training, what that number is).  Only the MLX backend asks MLX about
    Metal: a torch run must not import MLX (mlxft/__init__.py says why)."""
    if backend == "mlx":
        limit = _metal_working_set()
        if limit:
            return limit, "Metal recommended working set"
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "RAM"
    except (ValueError, OSError, AttributeError):
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, timeout=5
            )
            return int(out.stdout.strip()), "RAM"
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    return 0, "unknown"
