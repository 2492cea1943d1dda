"""Measured fp32 matmul (sgemm) peak of this machine, per framework, as JSON on stdout.

    python benchmarks/peak.py mlx      # MLX with the BLAS mlxft loads (MLXFT_BLAS=reference: the
    wheel's)
    python benchmarks/peak.py torch

The best of several n×n×n products (n = 1024, 2048) in GFLOP/s: the denominator of MFU.
"""

from __future__ import annotations

import json
import sys
import time


def best_rate(run, n: int, repeats: int) -> float:
    run(n)  # warm-up: thread pools, allocations
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        run(n)
        best = min(best, time.perf_counter() - tic)
    return 2 * n**3 / best / 1e9


def mlx_peak(sizes) -> dict:
    import mlx.core as mx

    import mlxft  # noqa: F401  (loads OpenBLAS unless MLXFT_BLAS=reference)
    from mlxft.cpu import blas as _blas

    mats = {}

    def run(n):
        if n not in mats:
            mats[n] = (mx.random.normal((n, n)), mx.random.normal((n, n)))
            mx.eval(*mats[n])
        mx.eval(mats[n][0] @ mats[n][1])

    rates = {n: best_rate(run, n, 5) for n in sizes}
    return {
        "framework": "mlx",
        "blas": _blas.status(),
        "gflops": max(rates.values()),
        "by_size": rates,
    }


def torch_peak(sizes) -> dict:
    import torch

    mats = {}

    def run(n):
        if n not in mats:
            mats[n] = (torch.randn(n, n), torch.randn(n, n))
        mats[n][0] @ mats[n][1]

    rates = {n: best_rate(run, n, 5) for n in sizes}
    out = {
        "framework": "torch",
        "threads": torch.get_num_threads(),
        "gflops": max(rates.values()),
        "by_size": rates,
    }
    from mlxft.torch_backend.cpu_matmul import _linear, _pointwise

    if (
        _pointwise() is not None
    ):  # the oneDNN route our torch backend takes where it measures faster

        def run_onednn(n):
            _linear(mats[n][0], mats[n][1])

        out["onednn_gflops"] = max(best_rate(run_onednn, n, 5) for n in sizes)
    return out


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "mlx"
    sizes = [int(s) for s in sys.argv[2].split(",")] if len(sys.argv) > 2 else [1024, 2048]
    print(json.dumps((mlx_peak if which == "mlx" else torch_peak)(sizes)))
