"""Which torch device and dtype to run on, how much memory the run used there, and its RNG state.

Defaults favour the Mac this tool is built for: MPS, then CUDA, then the CPU; float32
unless a half type is asked for and the device really supports it (a half type that only
"works" by silently upcasting or erroring mid-run is refused up front instead).
"""

from __future__ import annotations

import resource
import sys

import numpy as np
import torch

from mlxft.errors import UserError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def available_devices() -> list:
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def pick_device(requested: str | None) -> torch.device:
    """`requested` (mps | cuda | cuda:N | cpu) or the best available: mps > cuda > cpu."""
    available = available_devices()
    if requested is None:
        for name in ("mps", "cuda", "cpu"):
            if name in available:
                return torch.device(name)
    kind, _, index = requested.partition(":")
    if kind not in ("mps", "cuda", "cpu") or (index and not (kind == "cuda" and index.isdigit())):
        raise UserError(f"device must be mps, cuda, cuda:N or cpu, got '{requested}'")
    if kind not in available:
        raise UserError(
            f"device '{requested}' is not available here (torch {torch.__version__}); available: "
            f"{', '.join(available)}"
        )
    if index and int(index) >= torch.cuda.device_count():
        raise UserError(
            f"device '{requested}' does not exist: this machine has {torch.cuda.device_count()} "
            f"CUDA device(s)"
        )
    return torch.device(requested)


def _mps_supports(dtype: torch.dtype) -> bool:
    try:  # bfloat16 on MPS needs macOS 14+; the only reliable test is to try
        (
            torch.ones(2, 2, device="mps", dtype=dtype)
            @ torch.ones(2, 2, device="mps", dtype=dtype)
        ).cpu()
        return True
    except (RuntimeError, TypeError):
        return False


def pick_dtype(requested: str, device: torch.device, stored: str | None = None) -> torch.dtype:
    """float32 by default on MPS/CPU; on CUDA `auto` keeps a checkpoint stored in a supported
    half type.  An explicit half type the device cannot train in is a UserError."""
    if requested == "auto":
        if device.type == "cuda" and stored in ("bfloat16", "float16"):
            if stored == "float16" or torch.cuda.is_bf16_supported():
                return _DTYPES[stored]
        return torch.float32
    dtype = _DTYPES[requested]
    if dtype == torch.float32:
        return dtype
    if device.type == "cpu" and dtype == torch.float16:
        raise UserError(
            "dtype float16 is not supported on the CPU by the torch backend; use float32 or "
            "bfloat16"
        )
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"dtype bfloat16 is not supported by {torch.cuda.get_device_name(device)}; use float16 "
            f"or float32"
        )
    if device.type == "mps" and not _mps_supports(dtype):
        raise UserError(
            f"dtype {requested} is not supported on this Mac's MPS (bfloat16 needs macOS 14+); use "
            f"float32"
        )
    return dtype


class MemoryMeter:
    """Peak memory in GB, by the device's own accounting.

    CUDA: the allocator's peak.  MPS: the driver's allocation, sampled at each report (MPS
    keeps no peak).  CPU: the process's peak RSS, which the OS cannot reset."""

    def __init__(self, device: torch.device):
        self.device = device
        self._mps_peak = 0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "mps":
            self._mps_peak = torch.mps.driver_allocated_memory()

    def peak_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        if self.device.type == "mps":
            self._mps_peak = max(self._mps_peak, torch.mps.driver_allocated_memory())
            return self._mps_peak / 1e9
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss * (1 if sys.platform == "darwin" else 1024) / 1e9


def rng_state(device: torch.device) -> dict:
    """The generators that drive LoRA dropout: torch's CPU one, and the device's own."""
    out = {"torch.cpu": torch.get_rng_state().numpy()}
    if device.type == "cuda":
        out["torch.cuda"] = torch.cuda.get_rng_state(device).numpy()
    elif device.type == "mps":
        out["torch.mps"] = torch.mps.get_rng_state().numpy()
    return out


def set_rng_state(device: torch.device, state: dict) -> None:
    def tensor(key):
        return torch.from_numpy(np.asarray(state[key], dtype=np.uint8).copy())

    if "torch.cpu" not in state:
        raise UserError("RNG state has no 'torch.cpu': it was saved by another backend")
    torch.set_rng_state(tensor("torch.cpu"))
    if device.type == "cuda" and "torch.cuda" in state:
        torch.cuda.set_rng_state(tensor("torch.cuda"), device)
    elif device.type == "mps" and "torch.mps" in state:
        torch.mps.set_rng_state(tensor("torch.mps"))
