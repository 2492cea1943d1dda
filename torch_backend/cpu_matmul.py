"""The frozen float32 linears on oneDNN where it beats torch's default CPU sgemm.

Why: torch's x86 wheels do float32 matmuls with MKL, and MKL runs its AVX2 code on AMD CPUs,
where the oneDNN bundled in the same wheel runs AVX-512 kernels about twice as fast
(benchmarks/RESULTS.md).  Frozen matmuls (base weights and output head) are most of a LoRA
step.  Only frozen
weights move: forward y = x Wᵀ (+ b) and the input gradient dy W run on oneDNN, there is no
weight gradient, and trainable weights (LoRA, full fine-tuning) keep torch's own autograd.

Which library runs is measured, not assumed: at setup both multiply a batch-sized input by one of
the model's weights, and oneDNN is used when it is clearly faster (it is not on every CPU; on an
Intel CPU MKL's own AVX-512 path is as good).  `MLXFT_CPU_MATMUL=mkl|onednn` forces a side.
Results agree with MKL's to float32 rounding (relative 1e-6: another summation order).
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from mlxft import flags


def _pointwise():
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    return op if op is not None and torch.backends.mkldnn.is_available() else None


def _linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    try:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [None], "")
    except RuntimeError:  # a layout oneDNN has no kernel for: torch's own product, same math
        return torch.nn.functional.linear(x, weight, bias)


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return _linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return _linear(grad.contiguous(), weight.t()), None, None


class OneDNNLinear(nn.Linear):
    """nn.Linear whose frozen float32 product runs on oneDNN (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad or x.dtype != torch.float32 or x.device.type != "cpu":
            return super().forward(x)
        return _FrozenLinear.apply(x, self.weight, self.bias)


def _rate(fn, flops: float) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        tic = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - tic)
    return flops / best / 1e9


def choose(weight: torch.Tensor, rows: int) -> tuple:
    """('onednn' | 'mkl', note) for float32 CPU products with `weight` (out, in) at `rows` rows."""
    forced = flags.cpu_matmul()
    if forced:
        if forced == "onednn" and _pointwise() is None:
            return "mkl", "torch default (oneDNN unavailable in this torch)"
        return (
            forced,
            f"{'oneDNN' if forced == 'onednn' else 'torch default'} (MLXFT_CPU_MATMUL={forced})",
        )
    if _pointwise() is None:
        return "mkl", "torch default (no oneDNN in this torch)"
    x = torch.randn(rows, weight.shape[1])
    w = weight.detach().float()
    flops = 2.0 * rows * w.shape[0] * w.shape[1]
    with torch.no_grad():
        default = _rate(lambda: torch.nn.functional.linear(x, w), flops)
        onednn = _rate(lambda: _linear(x, w), flops)
    if onednn > 1.2 * default:
        return (
            "onednn",
            f"oneDNN ({onednn:.0f} vs {default:.0f} GFLOP/s for torch's default, measured now)",
        )
    return "mkl", f"torch default ({default:.0f} vs {onednn:.0f} GFLOP/s for oneDNN, measured now)"


def frozen_linears(model: nn.Module) -> list:
    """The float32 CPU nn.Linear modules whose weights do not train."""
    return [
        m
        for m in model.modules()
        if type(m) is nn.Linear
        and not m.weight.requires_grad
        and m.weight.dtype == torch.float32
        and m.weight.device.type == "cpu"
    ]


def use_onednn(model: nn.Module, rows: int) -> str:
    """Move the model's frozen float32 linears to oneDNN if that measures faster; a note for the
    run header."""
    linears = frozen_linears(model)
    if not linears:
        return "torch default"
    # oneDNN caches a primitive per input shape, each holding its own scratch buffers (a copy of
    # the weight in oneDNN's layout), and batch lengths vary, so the cache grows peak memory by
    # a weight copy per length; without it the step is no slower (benchmarks/RESULTS.md).
    # Read once, when oneDNN first runs; a value the user set wins.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    probe = max(
        (m for m in linears if m is not head), key=lambda m: m.weight.numel(), default=linears[0]
    )
    side, note = choose(probe.weight, max(64, min(rows, 2048)))
    if side == "onednn":
        for module in linears:
            module.__class__ = OneDNNLinear
    return note
