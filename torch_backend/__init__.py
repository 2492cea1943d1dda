"""The PyTorch backend: the same config, loop, reports and adapter files as MLX, on torch devices.

Imported only for `backend: torch`, so the MLX path never loads torch.
"""

from mlxft.torch_backend.backend import TorchBackend

__all__ = ["TorchBackend"]
