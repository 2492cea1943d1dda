"""Causal self-attention for CPU training steps, swapped in for mlx-lm's SDPA helper.

On the CPU `mx.fast.scaled_dot_product_attention` falls back to matmul -> softmax -> matmul,
and its softmax pays MLX's slow CPU exp (the wheel's kernels are built for baseline x86-64, so
the exp polynomial's fma calls are software); at long sequences that softmax is a large share of
a step.  Here the same three steps run with the softmax's exp as `2 ** (x log2 e)` (libm's
powf, faster), the causal mask added by the score matmul itself (addmm), and the normalisation
applied to the output instead of the weights; same result, same peak memory
(benchmarks/RESULTS.md has the timings).

The swap is scoped: `fast_attention(model)` replaces the `scaled_dot_product_attention` name in
the model's own mlx-lm module for the duration of a `with` block (our train and eval steps), and
the replacement hands every call it does not cover (a KV cache, an explicit mask array,
attention sinks, non-float32 inputs) to the original.  Architectures stay mlx-lm's.
"""

from __future__ import annotations

import contextlib
import sys

import mlx.core as mx

from mlxft.mlx_backend.loss import exp_by_power

HELPER = "scaled_dot_product_attention"


@mx.custom_function
def shifted_exp(x: mx.array) -> mx.array:
    """exp(x - max(x)) over the last axis (each row's largest entry becomes 1, so no overflow)."""
    return exp_by_power(x - mx.stop_gradient(x.max(-1, keepdims=True)))


@shifted_exp.vjp
def _shifted_exp_vjp(primals, cotangent, output):
    # the max is a constant shift (softmax does not depend on it); uses only the output, so the
    # scores need not outlive the forward pass
    return (cotangent * output,)


_BIAS: list = []  # the one kept mask, for the longest length seen so far


def causal_bias(length: int) -> mx.array:
    """(length, length) additive mask: 0 on and below the diagonal, -inf above.

    One mask is kept, for the longest length so far, and shorter ones are its top-left corner
    (addmm copies its addend into the output in any case).  A mask per length would keep one
    (length, length) float32 array alive per batch shape, and length-sorted batches have many."""
    if not _BIAS or _BIAS[0].shape[0] < length:
        rows = mx.arange(length)
        bias = mx.where(rows[:, None] >= rows[None], 0.0, -mx.inf).astype(mx.float32)
        mx.eval(bias)
        _BIAS[:] = [bias]
    return _BIAS[0][:length, :length]


def causal_attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float) -> mx.array:
    """softmax(q k^T * scale + causal) v for (B, heads, L, D) inputs, grouped-query heads
    included (keys/values with fewer heads are shared by consecutive query heads, as in MLX)."""
    batch, q_heads, length, dim = queries.shape
    kv_heads = keys.shape[1]
    q = queries * scale
    if q_heads != kv_heads:
        q = q.reshape(batch, kv_heads, q_heads // kv_heads, length, dim)
        keys, values = keys[:, :, None], values[:, :, None]
    weights = shifted_exp(mx.addmm(causal_bias(length), q, keys.swapaxes(-1, -2)))
    # normalise the (…, L, D) output rather than the (…, L, L) weights: one pass and one buffer of
    # the size of the scores fewer, which keeps the peak at SDPA's
    out = (weights @ values) / weights.sum(-1, keepdims=True)
    return out.reshape(batch, q_heads, length, dim)


def _replacement(original):
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        covered = (
            cache is None
            and sinks is None
            and isinstance(mask, str)
            and mask == "causal"
            and queries.dtype == mx.float32
            and queries.shape[-2] == keys.shape[-2]
        )
        if not covered:
            return original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
        return causal_attention(queries, keys, values, scale)

    scaled_dot_product_attention.original = original
    return scaled_dot_product_attention


def model_modules(model) -> list:
    """The mlx-lm modules whose code the model's layers run (the model's and its blocks')."""
    names = {type(model).__module__}
    for _, module in model.named_modules():
        names.add(type(module).__module__)
    return [
        sys.modules[n] for n in sorted(names) if n.startswith("mlx_lm.models.") and n in sys.modules
    ]


@contextlib.contextmanager
def fast_attention(model):
    """Within the block, the model's mlx-lm modules call `causal_attention` for causal,
    cache-free float32 attention."""
    swapped = []
    for module in model_modules(model):
        original = getattr(module, HELPER, None)
        if original is None or hasattr(original, "original"):
            continue
        setattr(module, HELPER, _replacement(original))
        swapped.append((module, original))
    try:
        yield
    finally:
        for module, original in swapped:
            setattr(module, HELPER, original)
