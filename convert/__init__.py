"""Model format conversion: HF <-> MLX (`mlxft convert`), and the HF-directory writer fuse reuses."""

import importlib

import mlxft  # noqa: F401  (OpenBLAS before anything imports mlx.core)

# Loaded on first use (PEP 562): `mlxft`'s CLI imports convert.cli for every command, and a
# torch-backend run must not import MLX (see mlxft/__init__.py).
_WHERE = {"to_mlx": "convert.hf_to_mlx", "to_hf": "convert.mlx_to_hf", "save_hf_dir": "convert.files",
          "atomic_output_dir": "convert.files"}

__all__ = ["to_mlx", "to_hf", "save_hf_dir", "atomic_output_dir"]


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'convert' has no attribute {name!r}")
