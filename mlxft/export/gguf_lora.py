"""`mlxft export --to gguf-lora`: the adapter alone as a GGUF LoRA, for `llama-cli --lora` and
Ollama's `ADAPTER`, applied on top of a GGUF of the same base model.

llama.cpp adds scale·B·A to each adapted weight with scale = adapter.lora.alpha / rank, so we
write alpha = our scale × rank (exact for rsLoRA too).  The llama architecture's q/k rows are
permuted in the base GGUF (see gguf.py); B's output rows get the same permutation, A is
unchanged.  DoRA cannot be expressed this way (llama.cpp has no magnitude vector), so it is
refused with the way out: the fused export.

The base is loaded only to validate the adapter against it (the same one-line errors as
`mlxft generate`) and to read the scale the adapter was trained with; the A and B matrices are
the backend's own (`Backend.adapter_weights`), as it would save them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mlxft.errors import UserError


def export_gguf_lora(model: str, adapter_path: str, save_path: str) -> Path:
    from mlxft.adapters.files import split_key
    from mlxft.export.gguf import (
        ARCHITECTURES,
        Tensor,
        check_architecture,
        checked_output,
        gguf_tensors,
        read_config,
        require_gguf,
        write_gguf,
    )
    from mlxft.fileio import atomic_path
    from mlxft.inference.load import load_for_inference

    gguf = require_gguf()
    dest = checked_output(save_path, is_dir=False)
    if not Path(adapter_path).expanduser().is_dir():
        raise UserError(f"{adapter_path}: adapter directory not found")
    if adapter_kind(adapter_path) == "dora":
        raise UserError(
            f"{adapter_path}: a DoRA adapter cannot be a GGUF LoRA (llama.cpp adds s·BA and has no "
            "DoRA magnitude); export the fused model instead: "
            "mlxft export --to gguf --adapter-path "
            f"{adapter_path} ..."
        )
    _, config = read_config(model)
    arch = check_architecture(config, model)
    loaded = load_for_inference(model, adapter_path, backend="mlx", with_tokenizer=False)
    plan = loaded.plan
    pairs = {}  # module path -> {"lora_A": (r, in), "lora_B": (out, r)}
    for key, value in loaded.backend.adapter_weights().items():
        path, name = split_key(key)
        pairs.setdefault(path, {})[name] = np.asarray(value, dtype=np.float32)
    hf = [
        (f"{path}.weight", ("A", pairs[path]["lora_A"]), ("B", pairs[path]["lora_B"]))
        for path in (t.path for t in plan.targets)
    ]
    # map names (and permute B like the base weight) through the same code as the full export
    names_b = gguf_tensors(
        [(n, b.shape, lambda b=b: b) for n, _, (_, b) in hf],
        arch,
        config,
        ARCHITECTURES[config["model_type"]][1],
    )
    tensors = []
    for (_, (_, a), _), tb in zip(hf, names_b):
        tensors.append(
            Tensor(tb.name + ".lora_a", a.shape, lambda a=a: a, gguf.GGMLQuantizationType.F32)
        )
        tensors.append(
            Tensor(tb.name + ".lora_b", tb.shape, tb.load, gguf.GGMLQuantizationType.F32)
        )

    def metadata(writer):
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(plan.scale * plan.rank))
        writer.add_name(Path(adapter_path).name)

    with atomic_path(dest) as tmp:
        write_gguf(tmp, arch, metadata, tensors)
    return dest


def adapter_kind(adapter_path: str) -> str:
    """'lora' or 'dora', from the adapter's PEFT config (read before any weights)."""
    config_path = Path(adapter_path).expanduser() / "adapter_config.json"
    if not config_path.is_file():
        from mlxft.adapters.files import load_adapter

        # its one-line error for what is there instead
        load_adapter(Path(adapter_path).expanduser())
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config_path}:{err.lineno}: invalid JSON ({err.msg})") from None
    return "dora" if config.get("use_dora") else "lora"
