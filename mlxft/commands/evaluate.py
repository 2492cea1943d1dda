"""`mlxft evaluate`: generate for a split's records and score them (the work is
mlxft.inference.evaluate)."""

from __future__ import annotations

import click

from mlxft.errors import UserError, user_errors


@click.command("evaluate")
@click.option(
    "-c",
    "--config",
    help="YAML config or a recipe's name: data, hf_dataset, templates and model are read from it "
    "(flags override).",
)
@click.option("--model", help="Model directory or Hugging Face hub id.")
@click.option(
    "--adapter-path", help="Adapter to evaluate (PEFT layout); without it, the base model."
)
@click.option("--data", help="Data directory, file or hub dataset id (as for `mlxft lora`).")
@click.option(
    "--split", default="test", show_default=True, type=click.Choice(["test", "valid", "train"])
)
@click.option(
    "--max-tokens", "-m", type=int, default=128, show_default=True, help="Most tokens per answer."
)
@click.option("--limit", type=int, help="Evaluate the first N records only.")
@click.option(
    "--batch-size", type=int, default=8, show_default=True, help="Prompts generated together."
)
@click.option(
    "--text-split",
    help="Plain-text records: the prompt ends after the last occurrence of this "
    "marker, the rest is the reference (e.g. 'A:').",
)
@click.option("--backend", type=click.Choice(["mlx", "torch"]))
@click.option("--device", help="torch backend: mps, cuda or cpu (default: best available).")
@click.option(
    "--chat-template", help="Jinja chat template (text or file) instead of the tokenizer's."
)
@click.option(
    "--report", type=click.Path(dir_okay=False), help="Write the JSON report here (atomically)."
)
@click.option(
    "--worst",
    type=int,
    default=5,
    show_default=True,
    help="Print this many lowest-scoring examples.",
)
@click.option("--trust-remote-code", is_flag=True, default=None)
@user_errors
def evaluate_command(
    config, adapter_path, split, max_tokens, limit, batch_size, text_split, report, worst, **kw
):
    """Generate greedily for each record of a split and score it: exact match, normalized exact
    match, character-level BLEU and ROUGE-L."""
    from mlxft.config import build_config
    from mlxft.fileio import write_json
    from mlxft.inference.evaluate import run, summary_lines

    cfg = build_config(config, kw)
    if not cfg.model:
        raise UserError("no model: pass --model PATH_OR_HUB_ID or set 'model' in the config")
    result = run(
        cfg,
        adapter_path,
        split,
        max_tokens,
        limit,
        batch_size,
        text_split,
        echo=lambda line: click.echo(line, err=True),
    )
    for line in summary_lines(result, max(worst, 0)):
        click.echo(line)
    if report:
        write_json(report, result)
        click.echo(f"Wrote {report}")
