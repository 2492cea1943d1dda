"""Run `mlx_lm lora` unchanged, with our BLAS and a per-step JSON record.

    python benchmarks/mlx_lm_run.py --metrics OUT.jsonl -- <mlx_lm lora arguments>

Why a wrapper: (1) the same BLAS for both trainers: `import mlxft` loads OpenBLAS into the
process before mlx.core, exactly as for our trainer (MLXFT_BLAS=reference turns it off for
both); (2) mlx_lm 0.32 reports through a rich console, so instead of scraping it we hand its
trainer a TrainingCallback (its own public hook) that writes each report as a JSON line:
iteration, train_loss, tokens_per_second, trained_tokens, peak_memory.  Run with
--steps-per-report 1 to get one line per step; (3) the same batches: its train loop gets ours,
in our order (`our_batches`), as the PEFT runs do.
"""

from __future__ import annotations

import json
import sys

import mlxft  # noqa: F401  (OpenBLAS before mlx.core, as for our trainer)
from mlxft.cpu import blas as _blas


class JsonLines:
    """mlx_lm TrainingCallback writing every train/val report to a file."""

    def __init__(self, path: str):
        self.handle = open(path, "w", buffering=1)
        self.handle.write(json.dumps({"blas": _blas.status()}) + "\n")

    def on_train_loss_report(self, info: dict) -> None:
        self.handle.write(
            json.dumps({k: float(v) if hasattr(v, "item") else v for k, v in info.items()}) + "\n"
        )

    on_val_loss_report = on_train_loss_report  # the same line, with the validation keys


class _Rows:
    """Some rows of a dataset, as a dataset (what mlx_lm's iterate_batches reads)."""

    def __init__(self, dataset, index):
        self.dataset, self.index = dataset, [int(i) for i in index]

    def __len__(self):
        return len(self.index)

    def __getitem__(self, k):
        return self.dataset[self.index[k]]


def our_batches(theirs: list):
    """mlx_lm's train loop, fed our batches in our order (common.batch_order, the rows our
    trainer and the PEFT runs train on), each collated and padded by mlx_lm's own iterate_batches.
    Its own order differs from ours, and peak memory follows the largest batch seen."""
    from pathlib import Path

    from common import batch_order, load_rows
    from mlx_lm.tuner import trainer
    from transformers import AutoTokenizer

    def flag(name, default=None):
        return theirs[theirs.index(name) + 1] if name in theirs else default

    tokenizer = AutoTokenizer.from_pretrained(flag("--model"))
    rows, _ = load_rows(Path(flag("--data")), tokenizer, int(flag("--max-seq-length", 2048)))
    order = batch_order(
        rows, int(flag("--batch-size", 4)), int(flag("--seed", 0)), int(flag("--iters", 1000))
    )
    own = trainer.iterate_batches

    def iterate(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
        if not loop:  # evaluation (mlx_lm's train loop is the one that loops): its own batches
            yield from own(
                dataset, batch_size, max_seq_length, loop=loop, seed=seed, comm_group=comm_group
            )
            return
        for chunk in order:
            yield next(own(_Rows(dataset, chunk), len(chunk), max_seq_length, seed=seed))

    return iterate


def main() -> None:
    args = sys.argv[1:]
    split = args.index("--")
    mine, theirs = args[:split], args[split + 1 :]
    metrics = mine[mine.index("--metrics") + 1]
    from functools import partial

    from mlx_lm import lora

    callback = JsonLines(metrics)
    lora.get_reporting_callbacks = lambda *a, **k: callback
    lora.train = partial(lora.train, iterate_batches=our_batches(theirs))
    sys.argv = ["mlx_lm.lora", *theirs]
    lora.main()


if __name__ == "__main__":
    main()
