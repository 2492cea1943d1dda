"""`mlxft fuse`: the fused HF model must compute what base + adapter computes in mlxft."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mlxft.cli import main
from mlxft.config import build_config
from mlxft.inference.load import load_for_inference
from mlxft.training.session import Session
from tests.conftest import WIKISQL

IDS = np.array([[1, 5, 9, 30, 44, 100, 7, 8, 200, 13, 60, 2]])


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def small_data(root: Path) -> Path:
    out = root / "wikisql"
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", 32), ("valid", 8)):
        lines = (WIKISQL / f"{name}.jsonl").read_text().splitlines()[:n]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return out


def train_adapter(model, data, out, lora=None, **kw) -> Path:
    """A few real training steps at a high learning rate, so B (and DoRA's m) move away from
    init."""
    base = dict(
        model=str(model),
        data=str(data),
        train=True,
        iters=3,
        batch_size=4,
        num_layers=-1,
        learning_rate=1e-2,
        adapter_path=str(out),
        val_batches=1,
        max_seq_length=96,
        steps_per_eval=3,
    )
    base.update(kw)
    Session(build_config(None, base, lora or {"rank": 4, "alpha": 8}), reporter_quiet=True).train()
    return Path(out)


def hf_logits(model_dir) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits[0].numpy()


def our_logits(model_dir, adapter=None) -> np.ndarray:
    return load_for_inference(
        str(model_dir), None if adapter is None else str(adapter), with_tokenizer=False
    ).backend.logits(IDS)[0]


@pytest.mark.parametrize(
    "family,kind", [("llama", "lora"), ("qwen2", "lora"), ("phi3", "lora"), ("llama", "dora")]
)
def test_fused_model_in_transformers_equals_base_plus_adapter(tiny_models, tmp_path, family, kind):
    base = tiny_models[family]
    adapter = train_adapter(base, small_data(tmp_path), tmp_path / "adapter", fine_tune_type=kind)
    result = run(
        "fuse", "--model", base, "--adapter-path", adapter, "--save-path", tmp_path / "fused"
    )
    assert result.exit_code == 0, result.output
    ours = our_logits(base, adapter)
    fused = hf_logits(tmp_path / "fused")
    assert np.abs(fused - ours).max() < 1e-4
    assert np.abs(fused - hf_logits(base)).max() > 1e-2  # the adapter changed the model
    files = {p.name for p in (tmp_path / "fused").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files


def test_fused_model_generates_what_the_adapter_does(tiny_llama, tmp_path):
    adapter = train_adapter(tiny_llama, small_data(tmp_path), tmp_path / "adapter")
    assert (
        run(
            "fuse", "--model", tiny_llama, "--adapter-path", adapter, "--save-path", tmp_path / "f"
        ).exit_code
        == 0
    )
    args = ["generate", "--prompt", "table: 1-10015132-11 columns: Player", "-m", 12, "--quiet"]
    with_adapter = run(*args, "--model", tiny_llama, "--adapter-path", adapter)
    fused = run(*args, "--model", tmp_path / "f")
    plain = run(*args, "--model", tiny_llama)
    assert with_adapter.exit_code == 0, with_adapter.output
    assert fused.stdout == with_adapter.stdout != plain.stdout


def test_quantized_base_needs_de_quantize(tiny_llama, tmp_path):
    from mlxft.convert import to_mlx

    qbase = to_mlx(tiny_llama, tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32)
    adapter = train_adapter(qbase, small_data(tmp_path), tmp_path / "adapter")
    refused = run(
        "fuse", "--model", qbase, "--adapter-path", adapter, "--save-path", tmp_path / "f"
    )
    assert (
        refused.exit_code == 2
        and "MLX-quantized" in refused.stderr
        and "--de-quantize" in refused.stderr
    )
    assert not (tmp_path / "f").exists()
    done = run(
        "fuse",
        "--model",
        qbase,
        "--adapter-path",
        adapter,
        "--save-path",
        tmp_path / "f",
        "--de-quantize",
    )
    assert done.exit_code == 0, done.output
    assert np.abs(hf_logits(tmp_path / "f") - our_logits(qbase, adapter)).max() < 1e-4


def test_fuse_refuses_a_non_empty_destination_before_loading(tiny_llama, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    result = run(
        "fuse",
        "--model",
        tiny_llama,
        "--adapter-path",
        tmp_path / "missing",
        "--save-path",
        tmp_path / "out",
    )
    assert result.exit_code == 2 and "already exists and is not empty" in result.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_fuse_a_full_model_dir_as_adapter_is_explained(tiny_llama, tmp_path):
    shutil.copytree(tiny_llama, tmp_path / "full")
    result = run(
        "fuse",
        "--model",
        tiny_llama,
        "--adapter-path",
        tmp_path / "full",
        "--save-path",
        tmp_path / "o",
    )
    assert (
        result.exit_code == 2
        and "holds a full model" in result.stderr
        and "--model" in result.stderr
    )


@pytest.mark.parametrize("family,kind", [("llama", "lora"), ("phi3", "dora")])
def test_torch_backend_fuses_what_the_mlx_backend_fuses(tiny_models, tmp_path, family, kind):
    """`fuse --backend torch` (no MLX needed) writes what the MLX merge writes, to rounding."""
    base = tiny_models[family]
    adapter = train_adapter(base, small_data(tmp_path), tmp_path / "adapter", fine_tune_type=kind)
    for backend in ("mlx", "torch"):
        args = ["--backend", backend] + (["--device", "cpu"] if backend == "torch" else [])
        result = run(
            "fuse",
            "--model",
            base,
            "--adapter-path",
            adapter,
            "--save-path",
            tmp_path / backend,
            *args,
        )
        assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "mlx").iterdir()} == {
        p.name for p in (tmp_path / "torch").iterdir()
    }
    mlx, torch_fused = hf_logits(tmp_path / "mlx"), hf_logits(tmp_path / "torch")
    assert np.abs(torch_fused - mlx).max() < 1e-5
    assert np.abs(torch_fused - our_logits(base, adapter)).max() < 1e-4


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_fused_tensors_stream_what_fused_weights_return(tiny_models, tmp_path, backend):
    """`Backend.fused_tensors` (the GGUF export's source) is `fused_weights` one tensor at a
    time: same names, declared shapes, values; and listing or loading them leaves the adapters."""
    base = tiny_models["phi3"]
    adapter = train_adapter(base, small_data(tmp_path), tmp_path / "adapter", fine_tune_type="dora")
    loaded = load_for_inference(
        str(base),
        str(adapter),
        backend=backend,
        device="cpu" if backend == "torch" else None,
        with_tokenizer=False,
    )
    entries = loaded.backend.fused_tensors()
    streamed = {name: load() for name, _, load in entries}
    for name, shape, _ in entries:
        assert streamed[name].shape == shape and streamed[name].dtype == np.float32, name
    assert loaded.backend.adapter_weights()  # still adapted: nothing was merged in place
    assert np.abs(loaded.backend.logits(IDS)[0] - our_logits(base, adapter)).max() < 1e-5
    fused = loaded.backend.fused_weights()
    assert set(streamed) == set(fused)
    for name, value in fused.items():
        assert np.array_equal(streamed[name], np.asarray(value, dtype=np.float32)), name
