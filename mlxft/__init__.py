"""mlxft: MLX-native fine-tuning for causal language models, with a PyTorch fallback."""

from mlxft import _blas

_blas.ensure()  # must run before anything imports mlx.core (see _blas.py)

__version__ = "0.1.0"
