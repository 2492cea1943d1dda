"""`mlxft plot RUN [RUN...]`: training curves from metrics.jsonl as a picture or an HTML page
(the figure is `mlxft.plotting`)."""

from __future__ import annotations

import click

from mlxft.errors import user_errors


@click.command("plot")
@click.argument("runs", nargs=-1, required=True)
@click.option(
    "--save-path",
    default="loss.png",
    show_default=True,
    help="Output file: .png, .svg, .pdf, or .html (a self-contained page with the figure).",
)
@click.option(
    "--metrics",
    default="train_loss,val_loss,learning_rate",
    show_default=True,
    help="Comma list of metrics.jsonl keys; *_loss keys share a panel, each other key has its own.",
)
@user_errors
def plot(runs, save_path, metrics):
    """Draw the curves of one or more runs (adapter_path directories or metrics.jsonl files),
    overlaid: training loss as lines, validation loss as markers, the best step starred."""
    from mlxft.plotting import plot as draw
    from mlxft.plotting import pyplot

    keys = [k.strip() for k in metrics.split(",") if k.strip()]
    fig, loaded = draw(runs, save_path, keys)
    pyplot().close(fig)
    click.echo(
        f"Wrote {save_path} ({len(loaded)} run{'s' if len(loaded) > 1 else ''}: "
        f"{', '.join(r.name for r in loaded)})"
    )
