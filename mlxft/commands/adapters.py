"""`mlxft fuse | export | import`: adapters into models and into other tools' layouts
(`mlxft.inference.fuse`, `mlxft.adapters.interop`, `mlxft.export` for llama.cpp and Ollama)."""

from __future__ import annotations

import click

from mlxft.errors import UserError, user_errors


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
@click.option(
    "--to",
    "target",
    type=click.Choice(["mlx-lm", "gguf", "gguf-lora", "ollama"]),
    default="mlx-lm",
    show_default=True,
    help="mlx-lm: the adapter in mlx-lm's layout; gguf: base + adapter fused into one GGUF file; "
    "gguf-lora: the adapter alone as a GGUF LoRA; ollama: DIR/model.gguf + DIR/Modelfile.",
)
@click.option(
    "--adapter-path",
    help="Our adapter directory (PEFT layout). Optional for gguf/ollama (a base or full "
    "fine-tune model alone).",
)
@click.option(
    "--save-path",
    required=True,
    help="Output directory (mlx-lm, ollama) or .gguf file (gguf, gguf-lora).",
)
@click.option(
    "--model",
    help="Base model (gguf/gguf-lora/ollama: required; mlx-lm: needed when the adapter skips the "
    "first blocks, as mlx-lm counts blocks from the end). Default for mlx-lm: the adapter's "
    "base_model_name_or_path.",
)
@click.option(
    "--outtype",
    type=click.Choice(["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"]),
    default="f16",
    show_default=True,
    help="gguf/ollama: tensor type (k-quants use llama.cpp's quantizer).",
)
@click.option("--system", help="ollama: the Modelfile's SYSTEM message.")
@click.option(
    "--template",
    "template_file",
    help="ollama: an Ollama Go template file to use as TEMPLATE (for chat templates mlxft does "
    "not recognise).",
)
@click.option(
    "--name",
    help="ollama: the model name in the printed `ollama create` line (default: the "
    "directory name).",
)
@click.option("--trust-remote-code", is_flag=True)
@click.option(
    "--upload-repo", help="mlx-lm: push the exported adapter to this Hugging Face repo (org/name)."
)
@user_errors
def export(
    target,
    adapter_path,
    save_path,
    model,
    outtype,
    system,
    template_file,
    name,
    trust_remote_code,
    upload_repo,
):
    """Write a model or adapter for another tool: mlx-lm, llama.cpp (GGUF) or Ollama."""
    if target != "mlx-lm":
        from mlxft.export import export_to

        lines = export_to(
            target,
            model,
            adapter_path,
            save_path,
            outtype,
            system,
            template_file,
            name,
            trust_remote_code,
            note=lambda text: click.echo(text, err=True),
        )
        for line in lines:
            click.echo(line)
        return
    from mlxft.adapters.interop import export_adapter

    if adapter_path is None:
        raise UserError("--to mlx-lm needs --adapter-path (the adapter to export)")
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
