"""Base model + adapter -> one GGUF file that llama.cpp (and so Ollama, LM Studio) runs.

The adapter is fused on the fly (W + s·BA, DoRA's rescaled form) by the backend
(`Backend.fused_tensors`: each layer's own merge, computed when asked), and the file is
written tensor by tensor: the header lists every tensor's name, shape and type first (all
known from the loaded model without computing anything), then each tensor is fused,
converted and written, and dropped before the next.  So the export never holds a second copy
of the model, which is what lets a model that only just fits in memory for inference still be
exported.

Naming and layout follow llama.cpp's converter (read, not copied): tensor names come from
gguf-py's TensorNameMap, hyper-parameters are written under the architecture's keys, and the
llama architecture's q/k rows are permuted from Hugging Face's half-split rotary layout to the
interleaved one llama.cpp's llama graph expects.  k-quants are made by llama.cpp's own
quantizer (through llama-cpp-python) from a lossless staging file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxft import progress
from mlxft.errors import UserError
from mlxft.fileio import check_destination
from mlxft.hub import resolve_model
from mlxft.model_dir import read_model_config

# Hugging Face model_type -> (GGUF architecture, permute q/k rows for llama.cpp's rope layout)
ARCHITECTURES = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
    "phi3": ("phi3", False),
}
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")
K_QUANTS = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}


def require_gguf():
    import logging

    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the gguf package: pip install 'mlxft[gguf]'") from None
    # its notes on tokenizer details are not the user's problem
    logging.getLogger("gguf").setLevel(logging.ERROR)
    return gguf


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise UserError(
            "k-quant outtypes (q4_k_m, q5_k_m, q6_k) use llama.cpp's own quantizer: "
            "pip install llama-cpp-python (it compiles llama.cpp), or pick f16, bf16, q8_0 or q4_0"
        ) from None
    return llama_cpp


def check_architecture(config: dict, model: str) -> str:
    """The GGUF architecture for config.json's model_type, or a one-line refusal."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"{model}: architecture '{model_type}' cannot be exported to GGUF yet; supported: "
            f"{', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type][0]


# ----------------------------------------------------------------------------- inputs
def checked_output(save_path: str, is_dir: bool) -> Path:
    """The destination, refused before any work when it cannot be written."""
    dest = Path(save_path).expanduser().absolute()
    if is_dir:
        check_destination(dest, "save_path", empty=False)
    else:
        if dest.is_dir():
            raise UserError(
                f"save_path: {save_path} is a directory; give a file name like model.gguf"
            )
        check_destination(dest.parent, "save_path", empty=False)
    return dest


def read_config(model: str) -> tuple:
    """(model directory, config.json) without loading weights, for the checks that come first."""
    path = resolve_model(model)
    return path, read_model_config(path)


def load_model(
    model: str, adapter_path: str | None, trust_remote_code: bool, note: Callable[[str], None]
) -> tuple:
    """(mlxft.inference.load.Loaded, config) with the adapter attached; refuses an unsupported
    architecture before the load, and says when an MLX-quantized base gets de-quantized."""
    from mlxft.inference.load import load_for_inference

    if adapter_path is not None and not Path(adapter_path).expanduser().is_dir():
        raise UserError(f"{adapter_path}: adapter directory not found")
    _, config = read_config(model)
    check_architecture(config, model)
    loaded = load_for_inference(
        model, adapter_path, backend="mlx", trust_remote_code=trust_remote_code
    )
    if loaded.backend.quantized:
        bits = config.get("quantization", {}).get("bits", "?")
        note(
            f"Note: {model} is MLX-quantized ({bits}-bit); "
            "its weights are de-quantized for the GGUF"
        )
    return loaded, config


# ----------------------------------------------------------------------------- tensors
@dataclass
class Tensor:
    """One tensor of the output file; `load` computes its float32 data (HF layout) on demand."""

    name: str  # GGUF name (blk.0.attn_q.weight)
    shape: tuple  # numpy (row-major) shape
    load: Callable[[], np.ndarray]
    qtype: object = None  # gguf.GGMLQuantizationType, decided by plan_types


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of each head from HF's [first halves | second halves] rotary order to interleaved
    pairs."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _permuted(load: Callable[[], np.ndarray], n_head: int) -> Callable[[], np.ndarray]:
    return lambda: _permute(load(), n_head)


def gguf_tensors(hf: list, arch: str, config: dict, permute: bool) -> list:
    """HF-named weights -> GGUF-named Tensors (llama's q/k permuted), refusing unknown names."""
    gguf = require_gguf()

    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, int(config["num_hidden_layers"]))
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    out = []
    for name, shape, load in hf:
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UserError(
                f"tensor {name} has no GGUF name for architecture {arch}; "
                "this model is not supported"
            )
        if permute and name.endswith(
            ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")
        ):
            load = _permuted(load, heads if ".q_proj." in name else kv_heads)
        out.append(Tensor(new, shape, load))
    return out


def extra_tensors(config: dict, arch: str) -> list:
    """Tensors llama.cpp needs that HF computes at run time: llama-3 rope frequency factors and
    phi3's long/short rope factors."""
    rope = config.get("rope_scaling") or {}
    kind = (rope.get("rope_type") or rope.get("type") or "default").lower()
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    if kind == "llama3":
        base = float(config.get("rope_theta", 10000.0))
        freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        factor, low, high = (
            rope.get("factor", 8.0),
            rope.get("low_freq_factor", 1.0),
            rope.get("high_freq_factor", 4.0),
        )
        old = rope.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / freqs
        smooth = (old / wavelen - low) / (high - low)
        factors = np.where(
            wavelen < old / high,
            1.0,
            np.where(wavelen > old / low, factor, 1 / ((1 - smooth) / factor + smooth)),
        )
        data = factors.astype(np.float32)
        return [Tensor("rope_freqs.weight", data.shape, lambda d=data: d)]
    if arch == "phi3" and rope.get("long_factor"):
        long_f = np.asarray(rope["long_factor"], dtype=np.float32)
        short_f = np.asarray(rope["short_factor"], dtype=np.float32)
        return [
            Tensor("rope_factors_long.weight", long_f.shape, lambda d=long_f: d),
            Tensor("rope_factors_short.weight", short_f.shape, lambda d=short_f: d),
        ]
    return []


def plan_types(tensors: list, outtype: str) -> list:
    """Each tensor's GGUF type.  1-D tensors (norms, biases, rope factors) stay float32 in
    every outtype, as llama.cpp expects; a 2-D tensor whose rows are not a whole number of
    quantization blocks falls back to f16 (llama.cpp's converter does the same)."""
    gguf = require_gguf()
    T = gguf.GGMLQuantizationType
    wanted = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[outtype]
    for t in tensors:
        qtype = T.F32 if len(t.shape) < 2 else wanted
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if t.shape[-1] % block:
            qtype = T.F16
        t.qtype = qtype
    return tensors


def _nbytes(t: Tensor) -> int:
    import gguf

    return int(np.prod(gguf.quant_shape_to_byte_shape(t.shape, t.qtype)))


def _encode(data: np.ndarray, qtype) -> np.ndarray:
    import gguf

    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == T.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


# ----------------------------------------------------------------------------- metadata
FILE_TYPES = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q4_0": "MOSTLY_Q4_0",
}


def add_hparams(writer, config: dict, arch: str, outtype: str, name: str) -> None:
    """Architecture hyper-parameters under llama.cpp's keys (`<arch>.context_length`, ...)."""
    import gguf

    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_name(name)
    writer.add_context_length(int(config.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    if "head_dim" in config:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rotary = int(head_dim * float(config.get("partial_rotary_factor", 1.0)))
    writer.add_rope_dimension_count(rotary)
    if arch == "llama":
        writer.add_vocab_size(int(config["vocab_size"]))
    if arch == "phi3":
        writer.add_rope_scaling_orig_ctx_len(
            int(
                config.get("original_max_position_embeddings")
                or config.get("max_position_embeddings", 4096)
            )
        )
        writer.add_sliding_window(int(config.get("sliding_window") or 0))
    _add_rope_scaling(writer, config, arch)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES.get(outtype, "ALL_F32")))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_rope_scaling(writer, config: dict, arch: str) -> None:
    import gguf

    rope = config.get("rope_scaling") or {}
    kind = (rope.get("rope_type") or rope.get("type") or "default").lower()
    if kind in ("default", "llama3"):  # llama3: the factors are the rope_freqs tensor
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind in ("longrope", "su") and arch == "phi3":
        scale = config["max_position_embeddings"] / config["original_max_position_embeddings"]
        orig = config["original_max_position_embeddings"]
        writer.add_rope_scaling_attn_factors(
            math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0
        )
    else:
        raise UserError(
            f"rope_scaling type '{kind}' is not supported by the GGUF export "
            "(supported: none, linear, yarn, llama3, phi3 longrope)"
        )


# ----------------------------------------------------------------------------- writing
def write_gguf(path: Path, arch: str, metadata: Callable, tensors: list) -> None:
    """Header and metadata, then each tensor loaded, encoded and written in turn."""
    gguf = require_gguf()

    writer = gguf.GGUFWriter(str(path), arch)
    metadata(writer)
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), _nbytes(t), raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = sum(_nbytes(t) for t in tensors)
    try:
        with progress.bar(total, Path(path).name, unit="B", unit_scale=True) as bar:
            for t in tensors:
                writer.write_tensor_data(_encode(t.load(), t.qtype))
                bar.update(_nbytes(t))
    finally:
        writer.close()


_QUIET = []  # the ctypes log callback must outlive the call that installs it


def quantize_with_llama_cpp(src: Path, dst: Path, outtype: str) -> None:
    """llama.cpp's own k-quant mixes (which tensors get more bits), from a lossless GGUF.
    llama.cpp's per-tensor log lines are silenced: the user sees our one line."""
    import ctypes

    llama_cpp = require_llama_cpp()

    if not _QUIET:
        _QUIET.append(llama_cpp.llama_log_callback(lambda level, text, data: None))
        llama_cpp.llama_log_set(_QUIET[0], ctypes.c_void_p(0))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, K_QUANTS[outtype])
    params.nthread = max(1, (os.cpu_count() or 1))
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if status != 0:
        raise UserError(f"llama.cpp's quantizer failed on {src.name} (status {status})")


@dataclass
class Exported:
    path: Path
    arch: str
    outtype: str
    vocab: object  # gguf_vocab.Vocab
    config: dict  # config.json as read by mlxft.model_dir.read_model_config
    loaded: object  # mlxft.inference.load.Loaded (model path, tokenizer) for the Modelfile


def export_gguf(
    model: str,
    adapter_path: str | None,
    save_path: str,
    outtype: str = "f16",
    trust_remote_code: bool = False,
    note: Callable[[str], None] = lambda s: None,
) -> Exported:
    """Write `model` (+ the adapter in `adapter_path`, fused) to the GGUF file `save_path`."""
    from mlxft.export.gguf_vocab import add_vocab
    from mlxft.fileio import atomic_path

    if outtype not in OUTTYPES:
        raise UserError(f"--outtype must be one of {', '.join(OUTTYPES)}, got '{outtype}'")
    require_gguf()
    if outtype in K_QUANTS:
        require_llama_cpp()
    dest = checked_output(save_path, is_dir=False)
    loaded, config = load_model(model, adapter_path, trust_remote_code, note)
    arch = check_architecture(config, model)
    permute = ARCHITECTURES[config["model_type"]][1]
    tensors = gguf_tensors(loaded.backend.fused_tensors(), arch, config, permute) + extra_tensors(
        config, arch
    )
    staging = outtype if outtype not in K_QUANTS else _lossless(loaded.backend.dtype)
    plan_types(tensors, staging)
    vocab_box = []

    def metadata(writer):
        add_hparams(writer, config, arch, staging, Path(model).name)
        vocab_box.append(
            add_vocab(writer, loaded.model_path, int(config["vocab_size"]), loaded.tokenizer)
        )

    with atomic_path(dest) as tmp:
        if outtype in K_QUANTS:
            stage = tmp.with_name(tmp.name + ".staging")  # the quantizer's input, never kept
            try:
                write_gguf(stage, arch, metadata, tensors)
                quantize_with_llama_cpp(stage, tmp, outtype)
            finally:
                stage.unlink(missing_ok=True)
        else:
            write_gguf(tmp, arch, metadata, tensors)
    for line in vocab_box[0].notes:
        note(line)
    return Exported(dest, arch, outtype, vocab_box[0], config, loaded)


def _lossless(dtype: str) -> str:
    """The staging type that keeps the loaded weights exact: their own 16-bit type, else f32."""
    return {"float16": "f16", "bfloat16": "bf16"}.get(dtype, "f32")
