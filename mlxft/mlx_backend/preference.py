"""DPO / ORPO on MLX: the tensor side of `mlxft.training.preference` (the math and names).

`preference_step(backend, batches, lr, spec)` is `MLXBackend.preference_step`.  One forward per
batch of 2B rows (chosen then rejected).  When the model's head splits off exactly
(`mlxft.mlx_backend.loss.HeadLoss`), the head and the log-softmax run on the answer positions only
(plus the chosen prompts for ORPO's NLL), chunked on the CPU as in SFT.  Per-row sums are a
matmul with a (positions x rows) one-hot, so autodiff needs no scatter.  The DPO reference runs
first, outside the gradient: the same model with every LoRA/DoRA layer switched off, or the frozen
starting model for full fine-tuning.  Steps run eagerly (not mx.compile'd): the reference's
adapter switch is Python state a compiled graph would freeze.
"""

from __future__ import annotations

import contextlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from mlxft.mlx_backend.lora import LoRALinear
from mlxft.mlx_backend.loss import HeadLoss, chunked_token_losses
from mlxft.training.preference import (
    Positions,
    PreferenceSpec,
    objective,
    open_group,
    pack,
    pair_terms,
    reference_result,
    trained_tokens,
    unpack,
    world_sums,
)


@contextlib.contextmanager
def adapters_off(model):
    """Every LoRA/DoRA layer computes its base alone inside the block (the DPO reference).  The
    flag is read while the graph is built, so resetting it afterwards is safe with lazy arrays."""
    layers = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer in layers:
            layer.disabled = False


def log1mexp(x: mx.array) -> mx.array:
    """log(1 - e^x) for x < 0, without cancellation on either side of -log 2."""
    return mx.where(x < -0.6931471805599453, mx.log1p(-mx.exp(x)), mx.log(-mx.expm1(x)))


def token_logps(model, head, inputs: mx.array, targets: mx.array, rows: mx.array) -> mx.array:
    """log p(target) at the flat positions `rows`, float32; `head` is the model's HeadLoss split
    (head on those rows only) or None (the full model's logits)."""
    targets = targets.reshape(-1)[rows]
    if head is None:
        logits = model(inputs)
        logits = logits.reshape(-1, logits.shape[-1])[rows].astype(mx.float32)
        return -nn.losses.cross_entropy(logits, targets)
    hidden = head.body(inputs)
    hidden = hidden.reshape(-1, hidden.shape[-1])[rows]
    if head.chunked:
        return -chunked_token_losses(hidden, head.head_weight(), targets)
    return -nn.losses.cross_entropy(head.project(hidden).astype(mx.float32), targets)


class _Arrays:
    """One batch as MLX arrays: inputs, targets, the rows read and the row each one adds to."""

    def __init__(self, batch, spec: PreferenceSpec):
        at = Positions.of(batch, spec)
        self.inputs, self.targets = mx.array(batch.inputs), mx.array(batch.targets)
        self.rows = mx.array(at.rows.astype(np.int32))
        # one-hot (rows, 2B) weighted by the answer mask: per-row sums as a matmul
        onehot = (at.row[:, None] == np.arange(len(at.counts))[None, :]).astype(np.float32)
        self.gather = mx.array(onehot * at.answer[:, None])
        self.nll = mx.array(at.nll)
        self.counts = mx.array(at.counts)

    def logps(self, model, head) -> tuple:
        """(answer log-prob sums per row (2B,), NLL sum of the chosen rows)."""
        lp = token_logps(model, head, self.inputs, self.targets, self.rows)
        return lp @ self.gather, -(lp * self.nll).sum()


def _head(backend):
    return backend._loss if isinstance(backend._loss, HeadLoss) else None


def reference_logps(backend, a: _Arrays) -> mx.array:
    if backend.cfg.fine_tune_type == "full":
        model, head = backend.frozen_reference()
        out = a.logps(model, head)[0]
    else:
        with adapters_off(backend.model):
            out = a.logps(backend.model, _head(backend))[0]
    out = mx.stop_gradient(out)
    mx.eval(out)
    return out


def preference_step(backend, batches: list, lr, spec: PreferenceSpec, stop: bool = False) -> dict:
    """One optimizer step over the group (lr given) or an evaluation (lr None): mlxft.preference.
    In a distributed world `batches` are this rank's shares; the gradients, every sum and the
    stop vote are summed over the ranks (one all-reduce per step, one all-gather per
    evaluation), so every rank returns the world's sums."""
    train = lr is not None and not spec.reference_only
    model = backend.model
    model.train(train)
    pairs, nll_tokens, sums = open_group(batches, spec)
    head = _head(backend)

    def loss(ref, a: _Arrays):
        logps, nll = a.logps(model, head)
        losses, terms = pair_terms(logps, ref, a.counts, spec, nn.log_sigmoid, log1mexp)
        return objective(losses.sum(), nll, pairs, nll_tokens, spec), terms, nll

    acc, refs = None, []
    try:
        with backend._kernels():
            for batch in batches:
                if not batch.size:  # an epoch's short last batch left this rank no pair
                    continue
                a = _Arrays(batch, spec)
                ref = None
                if spec.needs_reference:
                    ref = (
                        reference_logps(backend, a)
                        if batch.ref_logps is None
                        else mx.array(batch.ref_logps)
                    )
                    if spec.reference_only:
                        refs.append((batch.pairs, np.array(ref).reshape(2, -1).T))
                        continue
                if train:
                    step = nn.value_and_grad(model, lambda ref=ref, a=a: loss(ref, a))
                    (_, terms, nll), grads = step()
                    acc = grads if acc is None else tree_map(mx.add, acc, grads)
                    mx.eval(acc, terms, nll)
                else:
                    _, terms, nll = loss(ref, a)
                    mx.eval(terms, nll)
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + value.item()
                sums["nll_sum"] += nll.item()
                sums["tokens"] += trained_tokens(batch, spec)
        if spec.reference_only:
            return reference_result(refs)
        if not train:
            return world_sums(backend._comm, sums)
        if backend._comm:
            if acc is None:
                acc = tree_map(mx.zeros_like, model.trainable_parameters())
            acc, summed = backend._comm.reduce(acc, mx.array(pack(sums, stop)))
            sums = unpack(sums, np.array(summed))
        backend.optimizer.learning_rate = mx.array(lr, dtype=mx.float32)
        norm = backend._apply(acc, mx.array(1.0))
        mx.eval(backend._state, norm)
        sums["grad_norm"] = norm.item()
        usable = backend._usable(model.trainable_parameters(), backend.optimizer.state)
        sums["weights_finite"] = bool(usable.item())
    finally:
        model.train()
    return sums
