"""`mlxft info` and `mlxft recipes`: what this install runs on, and the recipes it ships."""

from __future__ import annotations

import click

from mlxft.errors import user_errors


@click.command()
@user_errors
def info():
    """Versions, the compute device and the BLAS behind MLX's CPU matmuls."""
    import platform

    import mlx.core as mx

    import mlxft
    from mlxft.cpu import blas

    click.echo(
        f"mlxft {mlxft.__version__}  python {platform.python_version()}  {platform.platform()}"
    )
    click.echo(
        f"mlx {mx.__version__}  device {mx.default_device()}  metal {mx.metal.is_available()}"
    )
    click.echo(f"BLAS: {blas.status()}")
    try:
        import mlx_lm

        click.echo(f"mlx-lm {mlx_lm.__version__}")
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch
    except ImportError:
        click.echo("torch: not installed (pip install 'mlxft[torch]' for --backend torch)")
        return
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    devices += ["mps"] if torch.backends.mps.is_available() else []
    click.echo(f"torch {torch.__version__}  devices {','.join(devices)}")


@click.command()
@user_errors
def recipes():
    """The recipes shipped with mlxft: `mlxft lora --config NAME` runs one."""
    from mlxft.config import packaged_recipes

    found = packaged_recipes()
    width = max(len(name) for name in found)
    for name, (_, summary) in found.items():
        click.echo(f"{name:<{width}}  {summary}")
