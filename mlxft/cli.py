"""The `mlxft` command line: one click group that registers the commands.

A dispatcher only (as mlx-lm's cli.py): each command lives in `mlxft.commands.<family>`, and
no command imports this module.  `mlxft …`, `python -m mlxft …` and `python -m mlxft.cli …`
all land in `main`.
"""

from __future__ import annotations

import click

from mlxft.commands.adapters import export, fuse, import_
from mlxft.commands.bench import bench_command
from mlxft.commands.convert import convert
from mlxft.commands.data import data_command
from mlxft.commands.evaluate import evaluate_command
from mlxft.commands.generate import chat, generate
from mlxft.commands.info import info, recipes
from mlxft.commands.plot import plot
from mlxft.commands.train import lora


def _one_line_warnings() -> None:
    """Warnings (e.g. the chat-template fallback) as `Warning: ...` lines, not source dumps."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        click.echo(f"Warning: {message}", err=True)

    warnings.showwarning = show


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlxft")
def main():
    """MLX-native fine-tuning for causal language models (LoRA, QLoRA, DoRA, full)."""
    _one_line_warnings()


for command in (
    info,
    recipes,
    lora,
    data_command,
    evaluate_command,
    plot,
    generate,
    chat,
    fuse,
    export,
    import_,
    convert,
    bench_command,
):
    main.add_command(command)


if __name__ == "__main__":
    main()
