"""Model format conversion: HF <-> MLX (`mlxft convert`), and the HF-directory writer fuse reuses."""

import mlxft  # noqa: F401  (loads OpenBLAS before anything imports mlx.core)

from convert.files import atomic_output_dir, save_hf_dir  # noqa: E402
from convert.hf_to_mlx import to_mlx  # noqa: E402
from convert.mlx_to_hf import to_hf  # noqa: E402

__all__ = ["to_mlx", "to_hf", "save_hf_dir", "atomic_output_dir"]
