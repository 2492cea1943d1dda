"""MLX directory -> HF directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

The model is rebuilt with mlx-lm (so quantized layers come back as QuantizedLinear /
QuantizedEmbedding) and de-quantized with `mlx_lm.utils.dequantize_model`. For llama,
qwen2, mistral (mlx-lm's llama) and phi3, mlx-lm's parameter names are transformers'
names; what `sanitize` drops is either a non-persistent buffer (`rotary_emb.inv_freq`)
or the tied `lm_head.weight`, which transformers re-ties from `tie_word_embeddings`.
`save_hf_dir(verify=True)` checks that claim per model before the directory appears.
"""

from __future__ import annotations

from pathlib import Path

from mlx.utils import tree_flatten

from mlxft.errors import UserError
from mlxft.fileio import check_destination
from mlxft.mlx_backend.arrays import numpy_weights
from mlxft.model_dir import check_dtype, check_model_dir, hf_config, read_model_config, save_hf_dir


def load_mlx_weights(mlx_path: Path) -> tuple[dict, dict]:
    """(HF-named de-quantized weights as numpy, config) of an MLX model directory."""
    from mlx_lm.utils import dequantize_model, load_model

    config = read_model_config(mlx_path)
    try:
        model, _ = load_model(mlx_path, lazy=True, model_config=config)
    except (ValueError, FileNotFoundError) as err:
        reason = str(err).splitlines()[0]
        raise UserError(f"{mlx_path}: mlx-lm cannot load this model ({reason})") from None
    if "quantization" in config:
        model = dequantize_model(model)
    return numpy_weights(dict(tree_flatten(model.parameters())), "Converting"), config


def to_hf(mlx_path, hf_path, dtype: str | None = None) -> Path:
    """Convert an MLX directory (quantized or not) to a HF directory; returns the output path.

    Quantized weights come back in their scales' dtype unless `dtype` says otherwise."""
    check_dtype(dtype)
    check_destination(Path(hf_path))
    src = Path(mlx_path).expanduser()
    if not src.is_dir():
        raise UserError(f"{src}: MLX model directory not found")
    check_model_dir(src)
    weights, config = load_mlx_weights(src)
    return save_hf_dir(weights, hf_config(config), src, Path(hf_path), dtype=dtype)
