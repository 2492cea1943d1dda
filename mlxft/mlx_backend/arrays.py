"""MLX arrays on their way out: the numpy view that files and the loop see.

Conversions, fusing and full fine-tunes hold `mx.array`s; the model-directory writer is
numpy-only (so the torch backend can use it without MLX).  A bfloat16 array crosses as its
raw bits, exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import mlx.core as mx
import numpy as np

from mlxft.model_dir import BF16, Tensor


def to_numpy(value) -> Tensor:
    """An mx.array (or anything array-like) as numpy, bfloat16 as `BF16` bits, no rounding."""
    if isinstance(value, mx.array):
        if value.dtype == mx.bfloat16:
            return BF16(np.array(value.view(mx.uint16)))
        return np.array(value)
    return value if isinstance(value, BF16) else np.asarray(value)


def numpy_weights(weights: Mapping[str, mx.array]) -> dict:
    """{name: Tensor}, evaluating the (possibly lazy) MLX graph once."""
    mx.eval(list(weights.values()))
    return {name: to_numpy(v) for name, v in weights.items()}
