"""The PyTorch anchor: PEFT LoRA + transformers, as people run it today, timed per step.

    python benchmarks/peft_run.py --mode trainer|loop --model DIR --data DIR --metrics OUT.jsonl
        [--batch-size 4] [--max-seq-length 512] [--iters 20] [--rank 8] [--alpha 16]
        [--keys q_proj,v_proj] [--grad-checkpoint] [--mask-prompt] [--learning-rate 1e-4] [--seed 0]

--mode trainer: `transformers.Trainer` (AdamW, constant LR, padded batches with an attention
  mask, labels -100 on padding): what a PEFT tutorial does.
--mode loop: a plain loop (torch.optim.AdamW): the leanest PEFT.
Both train on the batches our trainers train on, in the same order (length-sorted chunks in a
seeded order: `batch_order`): tokens/s grows with row length, so a comparison on other rows
(e.g. the Trainer's group_by_length, which starts with its longest rows) would not be like for
like.  The Trainer gets them as a dataset whose items are whole batches, read in order (its
"sequential" sampler, one item per step: a last short chunk stays one step, as in ours).
Each step writes {"step", "tokens", "seconds", "loss"}; tokens are trained (non-padding)
targets, counted as our trainer counts them (len - 1 per row).  All linear modules of every
block when --keys is not given, as for the other trainers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import batch_order, load_rows  # noqa: F401  (shared with mlx_lm_run.py, which must not import torch)

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def collate(rows: list, pad_id: int, masked=None) -> dict:
    """Right-padded ids, attention mask, labels (-100 on padding and on masked prompt tokens)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(r)] = torch.tensor(r)
        labels[i, : masked[i] if masked else 0] = -100
        attention[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def trained_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def peft_model(args):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=args.keys.split(",") if args.keys else ALL_LINEAR,
    )
    model = get_peft_model(model, config)
    if args.grad_checkpoint:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model.enable_input_require_grads()
    return model


def run_loop(args, model, rows, masked, pad_id, out) -> None:
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.learning_rate, weight_decay=0.0
    )
    model.train()
    for step, chunk in enumerate(batch_order(rows, args.batch_size, args.seed, args.iters), 1):
        batch = collate([rows[i] for i in chunk], pad_id, [masked[i] for i in chunk])
        tic = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - tic
        out.write(
            json.dumps(
                {
                    "step": step,
                    "tokens": trained_tokens(batch),
                    "seconds": seconds,
                    "loss": loss.item(),
                }
            )
            + "\n"
        )


def run_trainer(args, model, rows, masked, pad_id, out) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    counts: list = []

    def collator(features):  # one feature = one of our batches
        chunk = features[0]["rows"]
        batch = collate([rows[i] for i in chunk], pad_id, [masked[i] for i in chunk])
        counts.append(trained_tokens(batch))
        return batch

    class Timer(TrainerCallback):
        """Step time = between consecutive step ends (data, forward, backward, optimizer), as a
        user of the Trainer experiences it; the loss of each step from its log (logging_steps=1)."""

        def __init__(self):
            self.last, self.seconds, self.losses = None, [], {}

        def on_train_begin(self, *a, **k):
            self.last = time.perf_counter()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            self.seconds.append(now - self.last)
            self.last = now

        def on_log(self, _args, state, _control, logs=None, **k):
            if logs and "loss" in logs:
                self.losses[state.global_step] = logs["loss"]

    training_args = TrainingArguments(
        output_dir=str(Path(args.metrics).parent / "hf_trainer_out"),
        per_device_train_batch_size=1,
        max_steps=args.iters,
        learning_rate=args.learning_rate,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        remove_unused_columns=False,
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=True,
        optim="adamw_torch",
    )
    timer = Timer()
    ordered = [
        {"rows": chunk} for chunk in batch_order(rows, args.batch_size, args.seed, args.iters)
    ]
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=ordered,
        data_collator=collator,
        callbacks=[timer],
    )
    trainer.train()
    for i, seconds in enumerate(timer.seconds):
        out.write(
            json.dumps(
                {
                    "step": i + 1,
                    "tokens": counts[i],
                    "seconds": seconds,
                    "loss": timer.losses.get(i + 1),
                }
            )
            + "\n"
        )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["trainer", "loop"], default="trainer")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--metrics", required=True)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--keys", default="")
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument(
        "--mask-prompt",
        action="store_true",
        help="prompt/completion rows: train on completions only",
    )
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    rows, masked = load_rows(args.data, tokenizer, args.max_seq_length, args.mask_prompt)
    model = peft_model(args)
    with open(args.metrics, "w", buffering=1) as out:
        out.write(
            json.dumps(
                {"torch": torch.__version__, "threads": torch.get_num_threads(), "mode": args.mode}
            )
            + "\n"
        )
        (run_trainer if args.mode == "trainer" else run_loop)(
            args, model, rows, masked, pad_id, out
        )


if __name__ == "__main__":
    main()
