"""`mlxft` command line: one click group; each subcommand lives beside the code it drives."""

from __future__ import annotations

import functools
import sys

import click

from mlxft.errors import UserError


def user_errors(fn):
    """Turn a UserError into `Error: <one line>` and exit status 2, with no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            click.echo(f"Error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlxft")
def main():
    """MLX-native fine-tuning for causal language models (LoRA, QLoRA, DoRA, full)."""


@main.command()
def info():
    """Versions, the compute device and the BLAS behind MLX's CPU matmuls."""
    import platform

    from mlxft import _blas

    import mlx.core as mx

    click.echo(f"mlxft {__import__('mlxft').__version__}  python {platform.python_version()}  {platform.platform()}")
    click.echo(f"mlx {mx.__version__}  device {mx.default_device()}  metal {mx.metal.is_available()}")
    click.echo(f"BLAS: {_blas.status()}")
    try:
        import mlx_lm

        click.echo(f"mlx-lm {mlx_lm.__version__}")
    except Exception:  # pragma: no cover
        pass
    try:
        import torch

        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (
            ["mps"] if torch.backends.mps.is_available() else []
        )
        click.echo(f"torch {torch.__version__}  devices {','.join(devices)}")
    except ImportError:
        click.echo("torch: not installed (pip install 'mlxft[torch]' for --backend torch)")


# --- subcommands registered by feature modules (one line each) ---
