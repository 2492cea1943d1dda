"""DPO / ORPO on torch: the tensor side of `mlxft.training.preference` (the math and names).

`preference_step(backend, batches, lr, spec)` is `TorchBackend.preference_step`.  One forward per
batch of 2B rows (chosen then rejected), the output head and the log-softmax on the answer
positions only (plus the chosen prompts for ORPO's NLL) when the model's head splits off exactly,
as in SFT (`TorchBackend._split_head`).  The DPO reference runs first, without gradients: the
same model with every LoRA/DoRA layer's adapter switched off, or the frozen starting model for
full fine-tuning.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from mlxft.torch_backend.lora import LoRALinear
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
    """Every LoRA/DoRA layer computes its base alone inside the block (the DPO reference)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer in layers:
            layer.disabled = False


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, without cancellation on either side of -log 2."""
    return torch.where(
        x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x))
    )


def token_logps(
    model, split, inputs: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """log p(target) at the flat positions `rows`, float32 (the head runs on those rows only
    when `split` = (body, head))."""
    if split is None:
        logits = model(input_ids=inputs, use_cache=False).logits.flatten(0, 1)[rows]
    else:
        body, head = split
        logits = head(body(input_ids=inputs, use_cache=False).last_hidden_state.flatten(0, 1)[rows])
    return -F.cross_entropy(logits.float(), targets.flatten()[rows], reduction="none")


class _Tensors:
    """One batch on the device: inputs, targets, the rows read and what each row adds to."""

    def __init__(self, batch, spec: PreferenceSpec, device):
        at = Positions.of(batch, spec)
        self.inputs = torch.as_tensor(batch.inputs, dtype=torch.long, device=device)
        self.targets = torch.as_tensor(batch.targets, dtype=torch.long, device=device)
        self.rows = torch.as_tensor(at.rows, dtype=torch.long, device=device)
        self.seq = torch.as_tensor(at.row, dtype=torch.long, device=device)
        self.mask = torch.as_tensor(at.answer, dtype=torch.float32, device=device)
        self.nll = torch.as_tensor(at.nll, dtype=torch.float32, device=device)
        self.counts = torch.as_tensor(at.counts, dtype=torch.float32, device=device)
        self.n = len(at.counts)

    def logps(self, model, split) -> tuple:
        """(answer log-prob sums per row (2B,), NLL sum of the chosen rows)."""
        lp = token_logps(model, split, self.inputs, self.targets, self.rows)
        per_row = torch.zeros(self.n, dtype=lp.dtype, device=lp.device).index_add(
            0, self.seq, lp * self.mask
        )
        return per_row, -(lp * self.nll).sum()


@torch.no_grad()
def reference_logps(backend, t: _Tensors) -> torch.Tensor:
    if backend.cfg.fine_tune_type == "full":
        model, split = backend.frozen_reference()
        return t.logps(model, split)[0]
    with adapters_off(backend.model):
        return t.logps(backend.model, backend._split)[0]


def preference_step(backend, batches: list, lr, spec: PreferenceSpec, stop: bool = False) -> dict:
    """One optimizer step over the group (lr given) or an evaluation (lr None): mlxft.preference.
    In a distributed world `batches` are this rank's shares; the gradients, every sum and the
    stop vote are summed over the ranks (one all-reduce per step, one all-gather per
    evaluation), so every rank returns the world's sums."""
    train = lr is not None and not spec.reference_only
    backend._set_training(train)
    pairs, nll_tokens, sums = open_group(batches, spec)
    params = (
        [p for group in backend.optimizer.param_groups for p in group["params"]] if train else []
    )
    if train:
        for group in backend.optimizer.param_groups:
            group["lr"] = lr
        backend.optimizer.zero_grad(set_to_none=True)
    refs = []
    for batch in batches:
        if not batch.size:  # an epoch's short last batch left this rank no pair
            continue
        t = _Tensors(batch, spec, backend._device)
        ref = None
        if spec.needs_reference:
            ref = (
                reference_logps(backend, t)
                if batch.ref_logps is None
                else torch.as_tensor(batch.ref_logps, dtype=torch.float32, device=backend._device)
            )
            if spec.reference_only:
                refs.append((batch.pairs, ref.view(2, -1).T.cpu().numpy()))
                continue
        with torch.set_grad_enabled(train):
            logps, nll = t.logps(backend.model, backend._split)
            losses, terms = pair_terms(logps, ref, t.counts, spec, F.logsigmoid, log1mexp)
            terms = {k: v.detach() for k, v in terms.items()}
            if train:
                objective(losses.sum(), nll, pairs, nll_tokens, spec).backward()
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + value.item()
        sums["nll_sum"] += nll.item()
        sums["tokens"] += trained_tokens(batch, spec)
    if spec.reference_only:
        return reference_result(refs)
    if not train:
        return world_sums(backend._comm, sums)
    if backend._comm:
        summed = backend._comm.reduce(params, torch.as_tensor(pack(sums, stop)))
        sums = unpack(sums, summed.cpu().numpy())
    clip = backend._clip if backend._clip else float("inf")
    sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, clip).item()
    backend.optimizer.step()
    backend._steps += 1
    sums["weights_finite"] = bool(backend._usable(params).item())
    return sums
