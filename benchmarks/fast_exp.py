"""A lead for closing the MLX-vs-torch gap on CPU: exp built from cheap MLX ops.

    python benchmarks/fast_exp.py [--tokens 1920] [--vocab 32000] [--seq 480]

Why: on this CPU MLX runs `mx.exp` at ~60-90 M elements/s while its add/mul run at ~10,000 M/s
and `floor`/`max`/`sum` at 1,000-2,000 M/s (MLX's CPU exp is not vectorized).  A training
step of the 40M bench model spends most of its non-matmul time in exp: the vocabulary
log-sum-exp of the loss (32000 exp per token), attention softmax (T per token per block) and
SiLU's sigmoid.  exp(x) = 2^n · 2^f with n = round(x·log2 e), |f| <= 1/2, 2^f by a degree-7
polynomial (rel. err ~1e-7, float32 round-off) and 2^n by writing the exponent bits, uses only
the fast ops.

Prints, as JSON: exp throughput (mx.exp vs poly, eager and mx.compile'd), max relative error,
the vocabulary cross-entropy forward+backward on (tokens, vocab) logits with mx.exp vs with the
polynomial exp (a mx.custom_function whose backward reuses the forward's normaliser), and one
block's causal attention forward+backward: MLX's SDPA vs matmul + polynomial softmax + matmul.
Result on the 2-core dev box (RESULTS.md): the exp itself is 8x faster compiled on cache-sized
tensors, but neither drop-in beats MLX's own ops within a step.  Why, found later: mx.compile
fuses at most 11 ops deep (`max_compile_depth` in mlx/compile.cpp) and cannot fuse the bit-cast
(`mx.view`), so this exp runs as ~5 kernels, each a full pass over memory; above ~2 M elements
it drops to mx.exp's speed.  And MLX's exp is slow for a simple reason: its wheel is built for
baseline x86-64 without FMA, so the 6 fma calls of its polynomial are software (`fmaf`).  What
the product ships instead (mlxft/mlx_backend/loss.py, attention.py): `2 ** (x log2 e)` through
MLX's power op (libm's powf, ~3x mx.exp, one pass) and fewer exp passes altogether.
"""

from __future__ import annotations

import argparse
import json
import time

import mlx.core as mx
import mlx.nn as nn

import mlxft  # noqa: F401  (OpenBLAS before mlx.core)

LOG2E = 1.4426950408889634
# Taylor coefficients of 2^f = e^(f ln 2) to degree 7: rel. err < 2e-7 on |f| <= 1/2
COEFFS = [
    1.0,
    0.6931471805599453,
    0.2402265069591007,
    0.05550410866482158,
    0.009618129107628477,
    0.0013333558146428443,
    0.00015403530393381606,
    1.525273380405984e-05,
]


def poly_exp(x: mx.array) -> mx.array:
    t = mx.clip(x * LOG2E, -126.0, 126.0)
    n = mx.floor(t + 0.5)
    f = t - n
    p = f * COEFFS[-1] + COEFFS[-2]
    for c in reversed(COEFFS[:-2]):
        p = p * f + c
    return p * mx.view((n.astype(mx.int32) + 127) << 23, mx.float32)


# fused into one pass by mx.compile: eager, each of the ~20 ops would stream the whole
# (tokens, vocab) tensor through memory and lose to mx.exp at large sizes
fused_exp = mx.compile(poly_exp)


@mx.custom_function
def poly_cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-row -log softmax(logits)[target], with the polynomial exp."""
    peak = mx.stop_gradient(logits.max(-1, keepdims=True))
    lse = mx.log(fused_exp(logits - peak).sum(-1)) + peak.squeeze(-1)
    return lse - mx.take_along_axis(logits, targets[..., None], -1).squeeze(-1)


@poly_cross_entropy.vjp
def _poly_ce_vjp(primals, cotangent, output):
    logits, targets = primals
    lse = output + mx.take_along_axis(logits, targets[..., None], -1).squeeze(-1)
    probs = fused_exp(logits - lse[..., None])
    onehot = mx.arange(logits.shape[-1]) == targets[..., None]
    return (probs - onehot) * cotangent[..., None], mx.zeros_like(targets)


@mx.custom_function
def poly_softmax(x: mx.array) -> mx.array:
    e = fused_exp(x - mx.stop_gradient(x.max(-1, keepdims=True)))
    return e / e.sum(-1, keepdims=True)


@poly_softmax.vjp
def _poly_softmax_vjp(primals, cotangent, output):
    return (output * (cotangent - (cotangent * output).sum(-1, keepdims=True)),)


def attention_times(batch: int, seq: int, heads: int = 8, head_dim: int = 64) -> dict:
    """Causal attention forward+backward, one block: MLX's SDPA vs matmul + poly softmax +
    matmul."""
    q, k, v = (mx.random.normal((batch, heads, seq, head_dim)) for _ in range(3))
    mask = mx.triu(mx.full((seq, seq), -1e9), k=1)
    mx.eval(q, k, v, mask)
    scale = head_dim**-0.5

    def sdpa(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")

    def poly(q, k, v):
        return poly_softmax((q * scale) @ k.swapaxes(-1, -2) + mask) @ v

    out = {"attention max_abs_diff": float(mx.max(mx.abs(sdpa(q, k, v) - poly(q, k, v))))}
    for name, fn in (("sdpa", sdpa), ("poly", poly)):
        grad = mx.grad(lambda q, k, v: (fn(q, k, v) * v).sum(), argnums=(0, 1, 2))
        out[f"attention {batch}x{seq} fwd+bwd {name} s"] = round(
            timed(lambda: mx.eval(grad(q, k, v)), 3), 3
        )
    return out


def timed(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - tic)
    return best


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1920, help="batch x sequence positions (4 x 480)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument(
        "--seq", type=int, default=480, help="attention-score tensor (8 heads, seq x seq)"
    )
    args = p.parse_args(argv)
    out = {}
    scores = mx.random.normal((8, args.seq, args.seq)) * 3
    mx.eval(scores)
    exact, approx = mx.exp(scores), poly_exp(scores)
    out["max_rel_err"] = float(mx.max(mx.abs(approx - exact) / exact))
    for name, fn in (("mx.exp", mx.exp), ("poly_exp", poly_exp), ("poly_exp compiled", fused_exp)):
        out[f"{name} M/s"] = round(scores.size / timed(lambda: mx.eval(fn(scores))) / 1e6, 1)

    logits = mx.random.normal((args.tokens, args.vocab))
    targets = mx.random.randint(0, args.vocab, (args.tokens,))
    mx.eval(logits, targets)
    ref = mx.grad(lambda x: nn.losses.cross_entropy(x, targets).sum())
    fast = mx.grad(lambda x: poly_cross_entropy(x, targets).sum())
    g_ref, g_fast = ref(logits), fast(logits)
    out["ce_loss_abs_diff"] = float(
        mx.abs(
            nn.losses.cross_entropy(logits, targets).sum()
            - poly_cross_entropy(logits, targets).sum()
        )
    )
    out["ce_grad_max_abs_diff"] = float(mx.max(mx.abs(g_ref - g_fast)))
    out["ce fwd+bwd mx.exp s"] = round(timed(lambda: mx.eval(ref(logits)), 3), 3)
    out["ce fwd+bwd poly s"] = round(timed(lambda: mx.eval(fast(logits)), 3), 3)
    out["ce speedup"] = round(out["ce fwd+bwd mx.exp s"] / out["ce fwd+bwd poly s"], 2)
    out.update(attention_times(args.tokens // args.seq, args.seq))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
