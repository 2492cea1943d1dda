"""MLX arrays on their way out: the numpy view that files and the loop see.

Conversions, fusing and full fine-tunes hold `mx.array`s; the model-directory writer is
numpy-only (so the torch backend can use it without MLX).  A bfloat16 array crosses as its
raw bits, exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import mlx.core as mx
import numpy as np

from mlxft import progress
from mlxft.model_dir import BF16, Tensor


def to_numpy(value) -> Tensor:
    """An mx.array (or anything array-like) as numpy, bfloat16 as `BF16` bits, no rounding."""
    if isinstance(value, mx.array):
        if value.dtype == mx.bfloat16:
            return BF16(np.array(value.view(mx.uint16)))
        return np.array(value)
    return value if isinstance(value, BF16) else np.asarray(value)


def numpy_weights(weights: Mapping[str, mx.array], desc: str | None = None) -> dict:
    """{name: Tensor}, evaluating the (possibly lazy) MLX graph once.  With `desc`, on a
    terminal, tensor by tensor under a progress bar of bytes: the loading, casting, quantizing
    or fusing of a conversion happens here, and a long one should show that it moves."""
    if desc is None or not progress.on_terminal():
        mx.eval(list(weights.values()))
        return {name: to_numpy(v) for name, v in weights.items()}
    out = {}
    total = sum(v.nbytes for v in weights.values())
    with progress.bar(total, desc, unit="B", unit_scale=True) as bar:
        for name, value in weights.items():
            mx.eval(value)
            out[name] = to_numpy(value)
            bar.update(value.nbytes)
    return out
