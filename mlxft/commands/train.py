"""`mlxft lora`: fine-tune (LoRA, DoRA, QLoRA, full) and/or test, from a YAML config and flags
named as in `mlx_lm lora`; the work is `mlxft.training`."""

from __future__ import annotations

import click

from mlxft.errors import UserError, user_errors


def _lora_overrides(kw: dict) -> dict:
    """CLI flags -> config keys (flags named as in mlx-lm; a flag beats its YAML key)."""
    out = {
        k: v
        for k, v in kw.items()
        if k not in ("config", "rank", "alpha", "dropout", "lora_keys", "warmup")
    }
    lora = {
        k: v
        for k, v in (
            ("rank", kw["rank"]),
            ("alpha", kw["alpha"]),
            ("dropout", kw["dropout"]),
            ("keys", list(kw["lora_keys"]) or None),
        )
        if v is not None
    }
    if kw.get("warmup") is not None:
        out["lr_schedule"] = {"name": kw.get("lr_schedule") or "constant", "warmup": kw["warmup"]}
    out["eval_prompts"] = list(kw.get("eval_prompts") or []) or None
    out["report_to"] = list(kw.get("report_to") or []) or None  # no flag: the YAML's value stands
    switches = ("train", "test", "mask_prompt", "grad_checkpoint", "trust_remote_code", "resume")
    for flag in (*switches, "save_best", "eval_every_epoch", "precompute_ref_log_probs"):
        if not out.get(flag):
            out[flag] = None  # an absent switch must not override the YAML value
    return out, lora


@click.command()
@click.option(
    "-c",
    "--config",
    help="YAML config, or a recipe's name (`mlxft recipes`); flags override its keys.",
)
@click.option("--model", help="Local model directory or Hugging Face hub id.")
@click.option(
    "--data",
    help="Directory with train/valid[/test] .jsonl/.json/.parquet/.csv, one such file, a "
    "save_to_disk directory, or a hub dataset id (org/name).",
)
@click.option("--train", is_flag=True, default=None, help="Fine-tune.")
@click.option(
    "--test", is_flag=True, default=None, help="Report loss and perplexity on the test split."
)
@click.option(
    "--backend", type=click.Choice(["mlx", "torch"]), help="Tensor backend (default mlx)."
)
@click.option("--device", help="torch backend: mps, cuda or cpu (default: best available).")
@click.option("--fine-tune-type", type=click.Choice(["lora", "dora", "full"]))
@click.option("--num-layers", type=int, help="Adapt the last N transformer blocks (-1: all).")
@click.option("--rank", type=int, help="LoRA rank (lora_parameters.rank).")
@click.option("--alpha", type=float, help="LoRA alpha; scale = alpha / rank.")
@click.option("--dropout", type=float, help="LoRA dropout.")
@click.option(
    "--lora-keys",
    multiple=True,
    help="Module to adapt (repeatable), e.g. --lora-keys q_proj --lora-keys v_proj.",
)
@click.option("--batch-size", type=int)
@click.option("--iters", type=int, help="Optimizer steps.")
@click.option("--epochs", type=int, help="Epochs (when --iters is not given).")
@click.option("--learning-rate", type=float)
@click.option("--lr-schedule", type=click.Choice(["constant", "linear", "cosine"]))
@click.option("--warmup", type=int, help="Warm-up steps.")
@click.option("--optimizer", type=click.Choice(["adamw", "adam", "sgd"]))
@click.option("--weight-decay", type=float)
@click.option("--grad-accumulation-steps", type=int)
@click.option(
    "--grad-checkpoint", is_flag=True, default=None, help="Recompute activations to save memory."
)
@click.option(
    "--mask-prompt", is_flag=True, default=None, help="Train only on completions / assistant turns."
)
@click.option("--max-seq-length", type=int)
@click.option("--steps-per-report", type=int)
@click.option("--steps-per-eval", type=int)
@click.option("--val-batches", type=int)
@click.option("--test-batches", type=int)
@click.option("--save-every", type=int)
@click.option(
    "--early-stopping-patience",
    type=int,
    help="Stop after N evaluations without a val-loss improvement.",
)
@click.option(
    "--early-stopping-min-delta",
    type=float,
    help="Smallest val-loss decrease that counts (default 0).",
)
@click.option(
    "--save-best",
    is_flag=True,
    default=None,
    help="Keep the best-validation adapter in adapter_path/best/.",
)
@click.option(
    "--eval-every-epoch", is_flag=True, default=None, help="Also evaluate at the end of each epoch."
)
@click.option(
    "--eval-prompt",
    "eval_prompts",
    multiple=True,
    help="Generated greedily at each evaluation (repeatable).",
)
@click.option("--eval-max-tokens", type=int, help="Most tokens per eval prompt (default 64).")
@click.option("--adapter-path", help="Output directory for the adapter (default ./adapters).")
@click.option(
    "--resume-adapter-file",
    help="Start a NEW run from an existing adapter's weights (step 0, fresh optimizer).",
)
@click.option(
    "--resume",
    is_flag=True,
    default=None,
    help="Continue the interrupted run in --adapter-path from its latest checkpoint, exactly "
    "(weights, optimizer, step, data position, RNG).",
)
@click.option(
    "--resume-from",
    type=click.Path(file_okay=False),
    help="Continue from this checkpoint directory (adapter_path/checkpoints/step-NNNNNNN).",
)
@click.option("--keep-checkpoints", type=int, help="Checkpoints kept (newest; default 3).")
@click.option("--grad-clip", type=float, help="Clip the global gradient norm to this value.")
@click.option(
    "--revision",
    help="Hub model: the branch, tag or commit to download (pin it for reproducible runs).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the memory plan (from config, data and model metadata) and exit.",
)
@click.option("--seed", type=int)
@click.option(
    "--report-to",
    multiple=True,
    help="Experiment tracker: tensorboard, wandb or mlflow (repeatable or a comma list; "
    "default none).",
)
@click.option(
    "--run-name", help="The run's name in the trackers (default: adapter_path's directory name)."
)
@click.option("--project", help="W&B project / MLflow experiment (default mlxft).")
@click.option(
    "--distributed-timeout",
    type=float,
    help="mlx.launch / torchrun: seconds a rank waits for the others in a collective "
    "(default 600).",
)
@click.option(
    "--quantize", type=click.Choice(["4", "8"]), help="QLoRA: quantize the base model on load."
)
@click.option(
    "--q-group-size",
    type=click.Choice(["32", "64", "128"]),
    help="QLoRA quantization group size (default 64).",
)
@click.option("--trust-remote-code", is_flag=True, default=None)
@click.option(
    "--train-mode",
    type=click.Choice(["sft", "dpo", "orpo"]),
    help="sft (default), or preference tuning on {prompt, chosen, rejected} records: dpo, orpo.",
)
@click.option(
    "--beta", type=float, help="DPO: pull toward the reference (default 0.1); ORPO: odds weight."
)
@click.option(
    "--label-smoothing", type=float, help="DPO: assumed share of flipped labels, in [0, 0.5)."
)
@click.option(
    "--rpo-alpha", type=float, help="DPO: + this x the NLL of the chosen answers (RPO; unset: off)."
)
@click.option("--max-prompt-length", type=int, help="Preference prompts keep their last N tokens.")
@click.option(
    "--precompute-ref-log-probs",
    is_flag=True,
    default=None,
    help="DPO: reference log-probs in one pass before training (kept in checkpoints).",
)
@user_errors
def lora(**kw):
    """Fine-tune with LoRA (or DoRA / full) and/or evaluate on the test split."""
    from mlxft.config import build_config

    for key in ("quantize", "q_group_size"):
        if kw.get(key):
            kw[key] = int(kw[key])
    plan_only = kw.pop("dry_run")
    overrides, lora_params = _lora_overrides(kw)
    if plan_only:
        overrides["train"] = True  # plan the training run the other flags describe
    try:
        cfg = build_config(kw["config"], overrides, lora_params)
    except UserError as err:  # the command line is every rank's: rank 0 alone says what is wrong
        err.every_rank = True
        raise
    if plan_only:
        from mlxft.training.planner import dry_run

        for line in dry_run(cfg):
            click.echo(line)
        return
    if not (cfg.train or cfg.test):
        raise UserError("nothing to do: pass --train and/or --test", every_rank=True)
    from mlxft.training.world import detect

    world = detect(cfg)  # before the heavy imports: a bad world fails at once
    from mlxft.training.session import Session

    session = Session(cfg, world=world)
    if cfg.train:
        session.train()
    if cfg.test:
        session.test()
