"""mlxft: MLX-native fine-tuning for causal language models, with a PyTorch fallback."""

import importlib.abc
import sys

from mlxft.cpu import blas as _blas


class _BlasBeforeMLX(importlib.abc.MetaPathFinder):
    """Loads OpenBLAS (mlxft/cpu/blas.py) just before the first import of an `mlx.` submodule,
    not at `import mlxft`.

    Why not eagerly: OpenBLAS is loaded process-wide, and libtorch exports the BLAS names its
    own MKL answers to, so in a process that trains with torch OpenBLAS would take over torch's
    matmuls with a second thread pool, several times slower (benchmarks/RESULTS.md).
    Processes that never import MLX (the torch backend's) keep torch's BLAS."""

    def find_spec(self, name, path=None, target=None):
        # a submodule, not "mlx" itself: libraries probe find_spec("mlx") (transformers does)
        # without importing it, and the package alone loads no MLX library
        if name.startswith("mlx."):
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _blas.ensure()
        return None  # the normal finders import it


if "mlx.core" in sys.modules:
    _blas.ensure()  # too late: reported as such
elif not any(isinstance(f, _BlasBeforeMLX) for f in sys.meta_path):
    sys.meta_path.insert(0, _BlasBeforeMLX())

__version__ = "0.1.0"
