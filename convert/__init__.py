"""Hugging Face <-> MLX model conversions (`mlxft convert`); installed as `mlxft.convert`.

Only the MLX side lives here: the HF-directory writer is numpy-only (`mlxft.model_dir`), so
a torch-backend run never imports this package or MLX.
"""

from mlxft.convert.hf_to_mlx import to_mlx
from mlxft.convert.mlx_to_hf import to_hf

__all__ = ["to_mlx", "to_hf"]
