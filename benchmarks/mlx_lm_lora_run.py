"""Run mlx-lm-lora's own DPO trainer on our pair batches, with our BLAS and a per-step JSON record.

    <mlx-lm-lora venv>/bin/python benchmarks/mlx_lm_lora_run.py --metrics OUT.jsonl \
        -- <mlx_lm_lora.train args>

mlx-lm-lora lives in its own virtual environment (it pins its own dependency set; see
benchmarks/dpo_bench.py --setup).  This wrapper, run by that environment's Python:
(1) loads OpenBLAS as our trainer does (`import mlxft`, from this checkout);
(2) hands its train loop our pair batches in our order (the pairs our trainer meets, tokenized
by our pipeline, rendered through the model's chat template as mlx-lm-lora renders them), in its
own array layout (chosen and rejected arrays plus answer masks from the prompt length on).  Its
loop draws each batch from a fresh generator, i.e. a random batch per step, so ours come from one
iterator kept across calls;
(3) passes its `run()` a TrainingCallback that writes each report as a JSON line;
(4) on a CPU, supplies the Metal-only device key its DPO trainer reads first (`_cpu_device_info`).
Everything else is its trainer as shipped: two forwards per step (chosen, rejected) over full
logits, the reference model as a second loaded copy, its mx.compile'd step.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import mlxft  # noqa: E402,F401  (OpenBLAS before mlx.core, as for our trainer)
from benchmarks.mlx_lm_run import JsonLines  # noqa: E402  (the same per-report JSON lines)


def flag(args: list, name: str, default=None):
    return args[args.index(name) + 1] if name in args else default


def our_batches(args: list):
    """Our epochs of pair batches, as (chosen, rejected, chosen_masks, rejected_masks) arrays."""
    import mlx.core as mx
    import numpy as np

    from mlxft.config import build_config
    from mlxft.data.preference import load_preference_splits, pair_epoch_batches
    from mlxft.hub import load_tokenizer

    cfg = build_config(
        overrides={
            "model": flag(args, "--model"),
            "data": flag(args, "--data"),
            "train_mode": "dpo",
            "max_seq_length": int(flag(args, "--max-seq-length", 2048)),
        }
    )
    split = load_preference_splits(cfg, load_tokenizer(Path(cfg.model), cfg))["train"]
    size, seed = int(flag(args, "--batch-size", 4)), int(flag(args, "--seed", 0))
    epoch = 0
    while True:
        for batch in pair_epoch_batches(split, size, seed=seed, epoch=epoch, pad_id=0):
            width = max(max(len(split.chosen[i]), len(split.rejected[i])) for i in batch.pairs)
            arrays = []
            for rows, masks in (
                (split.chosen, split.chosen_masks),
                (split.rejected, split.rejected_masks),
            ):
                ids = np.zeros((len(batch.pairs), width), np.int32)
                mask = np.zeros((len(batch.pairs), width), np.float32)
                for j, i in enumerate(batch.pairs):
                    ids[j, : len(rows[i])] = rows[i]
                    mask[j, int(np.argmax(masks[i])) : len(rows[i])] = (
                        1.0  # from the prompt length on
                    )
                arrays.append((ids, mask))
            (c, cm), (r, rm) = arrays
            yield mx.array(c), mx.array(r), mx.array(cm), mx.array(rm)
        epoch += 1


def _cpu_device_info() -> None:
    """mlx-lm-lora's train_dpo starts with mx.set_wired_limit(mx.device_info()[
    "max_recommended_working_set_size"]), a key only Metal reports: on a CPU it stops with a
    KeyError before the first step.  A wired limit means nothing on a CPU (set_wired_limit is a
    no-op there), so report the key as 0 and let its trainer run unchanged."""
    import mlx.core as mx

    info = mx.device_info()
    if "max_recommended_working_set_size" not in info:
        mx.device_info = lambda: {**info, "max_recommended_working_set_size": 0}


def main() -> None:
    args = sys.argv[1:]
    metrics = args[args.index("--metrics") + 1]
    theirs = args[args.index("--") + 1 :]
    from mlx_lm_lora import train as lora_train
    from mlx_lm_lora.trainer import dpo_trainer

    ours = our_batches(theirs)
    own = dpo_trainer.iterate_dpo_batches

    def iterate(dataset, batch_size, max_seq_length, train=False):
        if not train:  # evaluation: its own batches
            yield from own(dataset, batch_size, max_seq_length, train=False)
            return
        yield next(ours)

    dpo_trainer.iterate_dpo_batches = iterate
    _cpu_device_info()
    parser = lora_train.build_parser()
    parsed = parser.parse_args(theirs)
    if parsed.config:  # as its main(): config keys, then its defaults, under the flags
        import yaml

        for key, value in (yaml.safe_load(Path(parsed.config).read_text()) or {}).items():
            if getattr(parsed, key, None) is None:
                setattr(parsed, key, value)
    for key, value in lora_train.CONFIG_DEFAULTS.items():
        if getattr(parsed, key, None) is None:
            setattr(parsed, key, value)
    lora_train.run(parsed, training_callback=JsonLines(metrics))


if __name__ == "__main__":
    main()
