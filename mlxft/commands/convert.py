"""`mlxft convert`: mlx-lm's flag names, plus `--to-hf` for the reverse direction."""

from __future__ import annotations

import click

from mlxft.errors import UserError, user_errors


@click.command()
@click.option(
    "--hf-path",
    "--model",
    "hf_path",
    help="HF model: directory or hub id (input); with --to-hf: output directory.",
)
@click.option(
    "--mlx-path", help="MLX model directory: output (default mlx_model); with --to-hf: input."
)
@click.option(
    "--to-hf",
    is_flag=True,
    help="Reverse: MLX directory (--mlx-path) -> HF directory (--hf-path), de-quantizing.",
)
@click.option("-q", "--quantize", is_flag=True, help="Quantize the weights (affine, mlx-lm).")
@click.option(
    "--q-bits", type=int, default=4, show_default=True, help="Bits per weight: 2, 3, 4, 5, 6 or 8."
)
@click.option(
    "--q-group-size",
    type=int,
    default=64,
    show_default=True,
    help="Quantization group size: 32, 64 or 128.",
)
@click.option(
    "--dtype",
    help="float16 | bfloat16 | float32 for the unquantized tensors (default: the config's dtype).",
)
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Accept pytorch_model.bin/*.pt weights (pickle runs code: trust the source).",
)
@click.option("--revision", help="Hub revision (branch, tag or commit) of --hf-path.")
@click.option(
    "--upload-repo", help="Push the output directory to this Hugging Face repo (org/name)."
)
@user_errors
def convert(
    hf_path,
    mlx_path,
    to_hf,
    quantize,
    q_bits,
    q_group_size,
    dtype,
    allow_pickle,
    revision,
    upload_repo,
):
    """Convert between Hugging Face and MLX model directories.

    \b
    HF -> MLX:  mlxft convert --hf-path org/model --mlx-path out [-q --q-bits 4]
    MLX -> HF:  mlxft convert --to-hf --mlx-path out --hf-path out-hf [--dtype bfloat16]

    The output directory must not exist (or be empty); it is written to a temporary
    directory beside it and renamed at the end, so it is either complete or absent.
    """
    from mlxft.convert import to_hf as mlx_to_hf
    from mlxft.convert import to_mlx
    from mlxft.hub import upload

    if to_hf:
        if not mlx_path or not hf_path:
            raise UserError(
                "--to-hf needs --mlx-path (the MLX model to read) and --hf-path (the directory to "
                "write)"
            )
        if quantize or allow_pickle or revision:
            raise UserError(
                "--to-hf writes a de-quantized HF model; -q, --allow-pickle and --revision do not "
                "apply"
            )
        out = mlx_to_hf(mlx_path, hf_path, dtype=dtype)
    else:
        if not hf_path:
            raise UserError(
                "--hf-path is required: a HF model directory or hub id (or pass --to-hf to go MLX "
                "-> HF)"
            )
        out = to_mlx(
            hf_path,
            mlx_path or "mlx_model",
            quantize=quantize,
            q_bits=q_bits,
            q_group_size=q_group_size,
            dtype=dtype,
            revision=revision,
            allow_pickle=allow_pickle,
        )
    click.echo(f"Wrote {out}")
    url = upload(out, upload_repo)
    if url:
        click.echo(f"Uploaded to {url}")
