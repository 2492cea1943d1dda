"""`mlxft data`: preview the rendered, tokenized, masked data (the work is mlxft.data.preview)."""

from __future__ import annotations

import sys

import click

from mlxft.errors import UserError, user_errors


@click.command("data")
@click.option(
    "-c", "--config", help="YAML config, or a recipe's name (`mlxft recipes`); flags override it."
)
@click.option(
    "--model", help="Model directory or hub id (its tokenizer and chat template are used)."
)
@click.option("--data", help="Data directory, file or hub dataset id (as for `mlxft lora`).")
@click.option(
    "-n", "--num-examples", type=int, default=3, show_default=True, help="Examples to show."
)
@click.option(
    "--split", type=click.Choice(["train", "valid", "test"]), default="train", show_default=True
)
@click.option(
    "--mask-prompt", is_flag=True, default=None, help="Train only on completions / assistant turns."
)
@click.option(
    "--train-mode",
    type=click.Choice(["sft", "dpo", "orpo"]),
    help="dpo/orpo: preview {prompt, chosen, rejected} pairs as preference tuning sees them.",
)
@click.option("--max-prompt-length", type=int, help="Preference prompts keep their last N tokens.")
@click.option("--max-seq-length", type=int)
@click.option("--batch-size", type=int)
@click.option(
    "--chat-template", help="Jinja chat template (text or file) instead of the tokenizer's."
)
@click.option(
    "--color/--no-color",
    default=None,
    help="Colour the trained spans (default: on a terminal); "
    "otherwise they are written [[like this]].",
)
@click.option("--trust-remote-code", is_flag=True, default=None)
@user_errors
def data_command(config, num_examples, split, color, **kw):
    """Show N examples as the trainer sees them, trained tokens marked, with token counts,
    truncated/dropped examples, a length histogram and the batches' padding share (with
    --train-mode dpo/orpo: preference pairs, each side's trained tokens marked)."""
    from mlxft.config import build_config
    from mlxft.data import load_splits, pad_token_id
    from mlxft.data.preference import load_preference_splits
    from mlxft.data.preview import pair_report, report
    from mlxft.hub import load_tokenizer, resolve_model

    cfg = build_config(config, kw)
    if not cfg.model:
        raise UserError(
            "no model: pass --model PATH_OR_HUB_ID or set 'model' in the config "
            "(its tokenizer is used)"
        )
    if num_examples < 0:
        raise UserError(f"--num-examples must be >= 0, got {num_examples}")
    tokenizer = load_tokenizer(resolve_model(cfg.model, cfg.revision), cfg)
    pairs = cfg.train_mode != "sft"
    splits = (load_preference_splits if pairs else load_splits)(cfg, tokenizer)
    if split not in splits:
        where = cfg.data or "hf_dataset"
        raise UserError(f"{where}: no {split} split (there are: {', '.join(splits)})")
    color = sys.stdout.isatty() if color is None else color
    write = pair_report if pairs else report
    for line in write(cfg, splits, tokenizer, pad_token_id(tokenizer), split, num_examples, color):
        click.echo(line, color=color)  # click strips ANSI codes off a terminal unless told
