"""Selective activation checkpointing: recompute a block, but keep its attention's output.

Why: a recomputed block runs its matmuls again, and its attention kernel, whose output is only
(B, T, d) plus one log-sum-exp per head and row — a few MB per block — while its cost grows with
T².  Keeping that output (torch's selective checkpointing policy: the attention kernels are
saved, everything else recomputed) skips the attention forward in every recomputed block; at
2,000 tokens that is about a third of the block's forward time on a CPU.  Falls back to plain
non-reentrant checkpointing where torch lacks the policy API (< 2.4).
"""

from __future__ import annotations

from functools import partial

import torch

# The fused attention kernels F.scaled_dot_product_attention dispatches to, per device.
_ATTENTION_OPS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
)


def attention_ops() -> set:
    found = set()
    for name in _ATTENTION_OPS:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None and hasattr(packet, "default"):
            found.add(packet.default)
    return found


def checkpoint_kwargs() -> dict:
    """Keyword arguments for torch.utils.checkpoint.checkpoint (through transformers)."""
    kwargs = {"use_reentrant": False}
    try:
        from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
    except ImportError:
        return kwargs
    saved = attention_ops()

    def policy(ctx, op, *args, **kw):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, policy)
    return kwargs
