"""The small interface every backend implements, and how one is chosen.

    load(model_path)                  weights in memory, frozen
    linear_modules(), num_blocks()    what adapters can attach to
    add_adapters(plan)                wrap the planned linears (plan comes from mlxft.adapters)
    adapter_weights() / set_adapter_weights(d)   {PEFT key: np.ndarray}
    setup_training(cfg)               optimizer, checkpointing, compiled step
    train_step(batches, lr)           -> (loss sum, trained tokens, grad norm)
    eval_loss(batches)                -> (loss sum, tokens)
    logits(input_ids)                 float32 numpy
    peak_memory_gb(), reset_peak_memory(), parameter_counts(), device, dtype

Batches are `mlxft.data.Batch` (numpy); learning rates come from `mlxft.schedule`.
"""

from __future__ import annotations

from mlxft.errors import UserError


def checkpointed_blocks(num_blocks: int) -> range:
    """The blocks grad_checkpoint recomputes: every block but the last.  The last block's
    activations feed the output head at once and are spent by the first step of the backward,
    so keeping them costs no more than the recomputation's own peak, and recomputing them is one
    block of forward work per step for nothing (1/8 of the recomputation on the 40M bench model)."""
    return range(max(num_blocks - 1, 0))


def get_backend(cfg):
    if cfg.backend == "mlx":
        from mlxft.mlx_backend import MLXBackend

        return MLXBackend(cfg)
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UserError("backend 'torch' needs PyTorch: pip install 'mlxft[torch]'") from None
    try:
        from torch_backend import TorchBackend
    except ImportError as err:
        raise UserError(f"backend 'torch' is unavailable: {err}") from None
    return TorchBackend(cfg)
