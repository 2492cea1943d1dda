"""Keep freed memory in the process during CPU training (glibc only), for both backends.

Why: MLX's CPU allocator caches at most 32 MB of freed buffers and hands the rest to
`malloc`/`free`, and torch's CPU allocator calls them directly.  glibc serves every block above
its mmap threshold (a few MB) with a fresh `mmap` and returns it with `munmap` on free, so each
training step page-faults its activations in again, and kernel time becomes a large share of
the step.  Raising glibc's mmap and trim thresholds keeps those pages in the heap for the next
step (benchmarks/RESULTS.md has the figures).  Raising MLX's own cache limit instead did not
help (its cache holds buffers by size class and still returned them through free).

The cost is resident memory: what a step freed stays mapped until the process exits (peak RSS
near the framework's peak instead of below it between steps).  Linux with glibc only (musl and
macOS have other allocators; Metal has MLX's own cache).  `MLXFT_MALLOC=system` leaves the
allocator alone.
"""

from __future__ import annotations

import ctypes
import sys

from mlxft import flags

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP = 2**31 - 1  # mallopt takes a C int: the largest threshold it accepts

_STATE = {"tuned": None}


def tune() -> str:
    """Apply the thresholds once per process; returns a one-line status for the run header."""
    if _STATE["tuned"] is None:
        _STATE["tuned"] = _apply()
    return _STATE["tuned"]


def _apply() -> str:
    if flags.malloc_system():
        return "system (MLXFT_MALLOC=system)"
    if not sys.platform.startswith("linux"):
        return "system"
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "system (no glibc)"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, KEEP) != 1 or mallopt(M_TRIM_THRESHOLD, KEEP) != 1:
        return "system (mallopt refused)"
    return "glibc, freed memory kept for reuse"
