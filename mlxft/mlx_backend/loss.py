"""The training loss on MLX: token cross-entropy summed over trained positions.

Two ways to the same number.  `loss_sum` calls the model and `nn.losses.cross_entropy`, as
mlx-lm does.  `HeadLoss` runs the model's body, then the output head and the cross-entropy
on the trained rows only (every device).  On the CPU it runs them a chunk of rows at a time
(`chunked_cross_entropy`), for three reasons (figures in benchmarks/RESULTS.md):

- exp.  MLX's CPU exp is slow (the wheel is built for baseline x86-64, so its polynomial's fma
  calls are software), and the loss head needs one per vocabulary entry per token twice: once
  in the forward log-sum-exp and again when its backward rebuilds the softmax.  Here the
  forward keeps the probabilities it already computed, so the backward needs no exp, and the
  one exp pass is `2 ** (x log2 e)`, which MLX's CPU runs faster (libm's powf).
- The gradient is written without autodiff through the softmax: with p = softmax(z) held
  constant, `sum(p * z)` has gradient p, so `stop_gradient(lse - sum(p*z)) + sum(p*z) - z[t]`
  has the value of the cross-entropy and the gradient p - onehot(t).  Plain MLX ops, no
  custom primitive, identical on every device.
- Memory.  The full (tokens, vocab) logits never exist at once: one chunk's logits are live at
  a time, and only the probabilities (which the backward needs in any case) are kept.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlxft.backend import head_probe, head_split_exact

LOG2E = 1.0 / math.log(2.0)
CHUNK_ELEMENTS = 1 << 21  # rows x vocab per chunk: 8 MB of float32 logits, cache-sized passes


def loss_sum(model, inputs, targets, mask):
    """Sum of token cross-entropies over trained positions, and their count."""
    logits = model(inputs).astype(mx.float32)
    losses = nn.losses.cross_entropy(logits, targets) * mask
    return losses.sum(), mask.sum()


def exp_by_power(x: mx.array) -> mx.array:
    """exp(x) as 2 ** (x log2 e): relative error <= |x| * 9e-8 (rounding of the product), i.e.
    under 3e-6 on the range a softmax weighs; faster than mx.exp on MLX's CPU."""
    return mx.power(2.0, x * LOG2E)


def chunked_cross_entropy(
    hidden: mx.array,
    weight: mx.array,
    targets: mx.array,
    mask: mx.array,
    exp=exp_by_power,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> mx.array:
    """sum over rows of mask * CE(hidden @ weight.T, targets), `weight` frozen (vocab, dim).

    hidden (N, dim), targets and mask (N,).  See the module docstring for the gradient trick."""
    step = max(1, chunk_elements // weight.shape[0])
    total = mx.array(0.0)
    for start in range(0, hidden.shape[0], step):
        chunk = slice(start, start + step)
        rows_loss = _chunk_losses(hidden[chunk], weight, targets[chunk], exp)
        total = total + (rows_loss * mask[chunk]).sum()
    return total


def chunked_token_losses(
    hidden: mx.array,
    weight: mx.array,
    targets: mx.array,
    exp=exp_by_power,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> mx.array:
    """Per-row CE(hidden @ weight.T, targets), (N,): the chunked head for losses that weigh rows
    differently (preference tuning sums them per sequence)."""
    step = max(1, chunk_elements // weight.shape[0])
    parts = [
        _chunk_losses(hidden[s : s + step], weight, targets[s : s + step], exp)
        for s in range(0, hidden.shape[0], step)
    ]
    return parts[0] if len(parts) == 1 else mx.concatenate(parts)


def _chunk_losses(hidden: mx.array, weight: mx.array, targets: mx.array, exp) -> mx.array:
    """One chunk's row losses, (rows,): value CE, gradient p - onehot (module docstring)."""
    z = (hidden @ weight.T).astype(mx.float32)
    zs = mx.stop_gradient(z)
    peak = zs.max(-1, keepdims=True)
    e = exp(zs - peak)
    norm = e.sum(-1, keepdims=True)
    probs = e / norm
    lse = mx.log(norm) + peak
    expected = (probs * z).sum(-1, keepdims=True)  # value sum(p z), gradient p
    picked = mx.take_along_axis(z, targets[:, None], -1)
    return (mx.stop_gradient(lse - expected) + expected - picked).squeeze(-1)


class HeadLoss:
    """loss_sum with the output head split off the model: body(inputs) -> hidden, then the
    head and the cross-entropy on the trained rows only (`rows`, from
    `mlxft.data.batching.head_rows`).  With a prompt masked, most positions carry no target,
    and the head (dim x vocab per row: a third of the 40M bench model's step) is skipped there.

    `chunked` runs `chunked_cross_entropy` against the head's weight (the CPU path); otherwise
    the head module itself (nn.Linear, a quantized head, a tied embedding's `as_linear`) and
    MLX's cross-entropy.  `HeadLoss.of(model)` returns None unless the split is exact for this
    model: model(x) equal to head(body(x)) on a probe (an architecture that scales or soft-caps
    its logits fails the probe and keeps the plain loss)."""

    def __init__(self, body, project, head_weight=None):
        self.body, self.project, self.head_weight = body, project, head_weight

    @property
    def chunked(self) -> bool:
        return self.head_weight is not None

    def __call__(self, model, inputs, targets, mask, rows=None):
        hidden = self.body(inputs)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        targets, mask = targets.reshape(-1), mask.reshape(-1).astype(mx.float32)
        if rows is not None:
            hidden, targets, mask = hidden[rows], targets[rows], mask[rows]
        if self.chunked:
            total = chunked_cross_entropy(hidden, self.head_weight(), targets, mask)
        else:
            logits = self.project(hidden).astype(mx.float32)
            total = (nn.losses.cross_entropy(logits, targets) * mask).sum()
        return total, mask.sum()

    @classmethod
    def of(cls, model, chunked: bool = False) -> HeadLoss | None:
        """The split for this model, or None.  `chunked` asks for the chunked cross-entropy,
        granted for a plain, frozen, bias-free float head (nn.Linear lm_head or tied
        nn.Embedding)."""
        body = getattr(model, "model", None)
        if body is None or not callable(body):
            return None
        head = getattr(model, "lm_head", None)
        if head is None:
            embed = getattr(body, "embed_tokens", None)
            if not hasattr(embed, "as_linear"):
                return None

            def project(h):
                return body.embed_tokens.as_linear(h)

            def weight():
                return body.embed_tokens.weight

            plain, name = type(embed) is nn.Embedding, "model.embed_tokens.weight"
        else:
            if not callable(head):
                return None

            def project(h):
                return model.lm_head(h)

            def weight():
                return model.lm_head.weight

            plain, name = type(head) is nn.Linear and "bias" not in head, "lm_head.weight"
        chunkable = (
            chunked
            and plain
            and mx.issubdtype(weight().dtype, mx.floating)
            and name not in dict(tree_flatten(model.trainable_parameters()))
        )
        split = cls(body, project, weight if chunkable else None)
        return split if split._exact(model) else None

    def _exact(self, model) -> bool:
        """model(probe) == head(body(probe)), dropout off (two deterministic forwards)."""
        vocab = getattr(model, "args", None) and getattr(model.args, "vocab_size", None)
        probe = mx.array(head_probe(vocab))
        training = model.training
        model.eval()
        try:
            direct = model(probe).astype(mx.float32)
            split = self.project(self.body(probe)).astype(mx.float32)
            return head_split_exact(np.array(direct), np.array(split))
        except Exception:  # an architecture whose body or head needs other arguments
            return False
        finally:
            model.train(training)
