"""Backend-neutral data pipeline: data files → tokenized splits → padded numpy batches.

Both trainers (MLX and PyTorch) consume the same `Batch` arrays, so the data a model sees,
its target mask and its batch order are identical whichever backend runs.

    splits = load_splits(cfg, tokenizer)                 # {'train', 'valid'[, 'test']}: Split
    batches = epoch_batches(splits['train'], cfg.batch_size, seed=cfg.seed, epoch=e,
                            pad_id=pad_token_id(tokenizer))
"""

from mlxft.data.batching import (
    Batch,
    epoch_batches,
    eval_batches,
    head_rows,
    make_batch,
    padding_fraction,
    share,
)
from mlxft.data.loader import Split, load_splits, pad_token_id

__all__ = [
    "Batch",
    "Split",
    "load_splits",
    "epoch_batches",
    "eval_batches",
    "padding_fraction",
    "pad_token_id",
    "make_batch",
    "head_rows",
    "share",
]
