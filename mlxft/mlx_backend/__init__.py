"""The MLX backend: mlx-lm's architectures, our LoRA layers and a compiled training step."""

from mlxft.mlx_backend.backend import MLXBackend

__all__ = ["MLXBackend"]
