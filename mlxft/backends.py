"""Which backend runs a config: the one place that imports a backend package.

Imported lazily, so an MLX run never loads torch and a torch run never loads MLX.
"""

from __future__ import annotations

from mlxft.backend import Backend
from mlxft.errors import UserError


def get_backend(cfg, world=None) -> Backend:
    """The backend `cfg` asks for, connected to `world` (`mlxft.training.world.World`; None:
    a single process)."""
    if cfg.backend == "mlx":
        from mlxft.mlx_backend import MLXBackend

        return MLXBackend(cfg, world)
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UserError("backend 'torch' needs PyTorch: pip install 'mlxft[torch]'") from None
    try:
        from mlxft.torch_backend import TorchBackend
    except ImportError as err:
        raise UserError(f"backend 'torch' is unavailable: {err}") from None
    return TorchBackend(cfg, world)
