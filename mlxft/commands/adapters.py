"""`mlxft fuse | export | import`: adapters into models and into other tools' layouts
(`mlxft.inference.fuse`, `mlxft.adapters.interop`)."""

from __future__ import annotations

import click

from mlxft.errors import user_errors


def _upload(path, repo_id) -> None:
    from mlxft.hub import upload

    url = upload(path, repo_id)
    if url:
        click.echo(f"Uploaded to {url}")


@click.command()
@click.option("--model", required=True, help="Base model directory or hub id.")
@click.option(
    "--adapter-path", default="adapters", show_default=True, help="Adapter directory (PEFT layout)."
)
@click.option(
    "--save-path", default="fused_model", show_default=True, help="Output HF model directory."
)
@click.option(
    "--de-quantize",
    "--dequantize",
    "de_quantize",
    is_flag=True,
    help="Required for a quantized base: write the fused model de-quantized.",
)
@click.option("--upload-repo", help="Push the fused model to this Hugging Face repo (org/name).")
@click.option(
    "--backend",
    type=click.Choice(["mlx", "torch"]),
    default="mlx",
    show_default=True,
    help="Backend that loads and merges (torch: no MLX needed).",
)
@click.option("--device", help="torch backend: mps, cuda or cpu (default: best available).")
@click.option("--trust-remote-code", is_flag=True)
@user_errors
def fuse(
    model, adapter_path, save_path, de_quantize, upload_repo, backend, device, trust_remote_code
):
    """Merge an adapter into its base model (W + scale·BA) and save a transformers model
    directory."""
    from mlxft.inference.fuse import fuse as run

    out = run(
        model,
        adapter_path,
        save_path,
        de_quantize=de_quantize,
        trust_remote_code=trust_remote_code,
        backend=backend,
        device=device,
    )
    click.echo(f"Wrote {out}")
    _upload(out, upload_repo)


@click.command("export")
@click.option("--adapter-path", required=True, help="Our adapter directory (PEFT layout).")
@click.option("--to", "target", type=click.Choice(["mlx-lm"]), default="mlx-lm", show_default=True)
@click.option("--save-path", required=True, help="Output directory.")
@click.option(
    "--model",
    help="Base model (needed when the adapter skips the first blocks: mlx-lm counts "
    "blocks from the end). Default: the adapter's base_model_name_or_path.",
)
@click.option(
    "--upload-repo", help="Push the exported adapter to this Hugging Face repo (org/name)."
)
@user_errors
def export(adapter_path, target, save_path, model, upload_repo):
    """Write an adapter in another tool's layout (mlx-lm: adapters.safetensors + its
    adapter_config.json)."""
    from mlxft.adapters.interop import export_adapter

    out = export_adapter(adapter_path, save_path, model)
    click.echo(f"Wrote {out} ({target} layout)")
    _upload(out, upload_repo)


@click.command("import")
@click.argument("src")
@click.option("--save-path", required=True, help="Output directory (PEFT layout).")
@click.option(
    "--model", help="Base model, to know its number of blocks (default: from the adapter's config)."
)
@user_errors
def import_(src, save_path, model):
    """Read an mlx-lm or PEFT adapter directory into our PEFT layout (float32, normalised
    config)."""
    from mlxft.adapters.interop import import_adapter

    click.echo(f"Wrote {import_adapter(src, save_path, model)}")
