"""The `mlxft bench` command line (the work itself is in `mlxft.bench.compare`)."""

from __future__ import annotations

from pathlib import Path

import click

from mlxft.bench.compare import bench, parse_backends, plot, table
from mlxft.errors import UserError, user_errors


@click.command("bench")
@click.option(
    "-c",
    "--config",
    type=click.Path(dir_okay=False),
    required=True,
    help="Training YAML (model, data, lora_parameters, batch_size, ...).",
)
@click.option(
    "--backends", help="Comma-separated, e.g. mlx,torch (default: every backend available here)."
)
@click.option(
    "--steps",
    type=int,
    help="Optimizer steps per backend (default 20; the config's iters is not used).",
)
@click.option(
    "--warmup", type=int, default=2, show_default=True, help="Leading steps left out of the rates."
)
@click.option(
    "--world-size",
    type=int,
    default=1,
    show_default=True,
    help="Also run each backend data-parallel on this many local processes (mlx.launch / "
    "torchrun) and compare with one.",
)
@click.option("--model", help="Override the config's model.")
@click.option("--data", help="Override the config's data.")
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), help="Write the report as JSON."
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    help="Write loss curves + throughput as PNG (needs matplotlib: pip install 'mlxft[plot]').",
)
@user_errors
def bench_command(config, backends, steps, warmup, world_size, model, data, json_path, plot_path):
    """Benchmark training on each backend (same batches, same start weights), one fresh process
    each."""
    if warmup < 0:
        raise UserError("--warmup must be >= 0")
    if steps is not None and steps < 1:
        raise UserError("--steps must be at least 1")
    if world_size < 1:
        raise UserError("--world-size must be at least 1")
    names = parse_backends(backends)
    if not names:
        raise UserError("bench: no backend available (install mlx or torch)")
    overrides = {k: v for k, v in (("model", model), ("data", data)) if v}
    report = bench(config, names, steps, warmup, overrides, world_size=world_size)
    for line in table(report):
        click.echo(line)
    if json_path:
        from mlxft.fileio import write_json

        write_json(Path(json_path), report)
        click.echo(f"Wrote {json_path}")
    if plot_path:
        if plot(report, Path(plot_path)):
            click.echo(f"Wrote {plot_path}")
        else:
            click.echo("Skipped the plot: matplotlib is not installed (pip install 'mlxft[plot]')")
