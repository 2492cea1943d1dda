"""QLoRA: LoRA (and DoRA) on top of quantized linears, from a quantized MLX directory or
quantized on load (`quantize: 4|8`); fused weights de-quantize correctly."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file

from mlxft.errors import UserError
from mlxft.mlx_backend.dora import DoRALinear
from mlxft.mlx_backend.lora import LoRALinear, dense_weight
from mlxft.training.session import Session
from tests.session_helpers import make_config, train, train_losses


def _adapted(session) -> list:
    return [m for _, m in session.backend.model.named_modules() if isinstance(m, LoRALinear)]


@pytest.fixture(scope="module")
def quantized_llama(tiny_llama, tmp_path_factory):
    """tiny llama converted with `mlxft convert -q` (4 bits, group 32)."""
    from mlxft.convert import to_mlx

    out = tmp_path_factory.mktemp("qllama") / "mlx-q4"
    return to_mlx(tiny_llama, out, quantize=True, q_bits=4, q_group_size=32)


def test_qlora_trains_on_a_quantized_mlx_model(quantized_llama, wikisql_small, tmp_path):
    session = train(quantized_llama, wikisql_small, tmp_path / "out", iters=8)
    layers = _adapted(session)
    assert len(layers) == 14  # 7 linears x 2 blocks, every one quantized underneath
    assert all(isinstance(m.base, nn.QuantizedLinear) and m.base.bits == 4 for m in layers)
    losses = train_losses(tmp_path / "out")
    assert losses[-1] < losses[0] - 0.2, losses
    assert session.last_val_loss < session.first_val_loss
    # the quantized base itself did not move: only A/B are trainable
    trainable = {k for k, _ in tree_flatten(session.backend.model.trainable_parameters())}
    assert trainable and all(k.endswith(("lora_A", "lora_B")) for k in trainable)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_on_load(tiny_llama, wikisql_small, tmp_path, bits):
    cfg = make_config(
        tiny_llama, wikisql_small, tmp_path / "out", quantize=bits, q_group_size=32, iters=1
    )
    session = Session(cfg, reporter_quiet=True)
    layers = _adapted(session)
    assert len(layers) == 14 and all(
        m.base.bits == bits and m.base.group_size == 32 for m in layers
    )
    # 4-bit weights differ from fp32 by more than 8-bit ones, but both stay close to the base
    down = dict(session.backend.model.named_modules())["model.layers.0.mlp.down_proj"]
    quantized = np.array(dense_weight(down.base))
    stored = load_file(str(tiny_llama / "model.safetensors"))
    error = np.abs(quantized - stored["model.layers.0.mlp.down_proj.weight"]).max()
    assert 0 < error < (0.05 if bits == 4 else 0.005)
    # parameters are counted at their dense size, quantized embeddings and lm_head included
    trainable, total = session.backend.parameter_counts()
    assert trainable == sum(m.lora_A.size + m.lora_B.size for m in layers)
    assert total == sum(v.size for v in stored.values()) + trainable


def test_qdora_trains_and_magnitude_starts_at_dequantized_norm(
    quantized_llama, wikisql_small, tmp_path
):
    cfg = make_config(
        quantized_llama, wikisql_small, tmp_path / "out", fine_tune_type="dora", iters=1
    )
    session = Session(cfg, reporter_quiet=True)
    layer = next(m for m in _adapted(session) if isinstance(m, DoRALinear))
    w = np.array(dense_weight(layer.base))
    np.testing.assert_allclose(
        np.array(layer.lora_magnitude_vector), np.linalg.norm(w, axis=1), rtol=1e-5
    )
    session.train()
    assert np.isfinite(session.last_val_loss)


@pytest.mark.parametrize("kind", [LoRALinear, DoRALinear])
def test_fused_weight_of_a_quantized_base_matches_the_layer(kind):
    """`fuse` writes W' = fused_weight(); x W'^T must equal what the trained layer computes."""
    mx.random.seed(0)
    base = nn.QuantizedLinear(64, 48, bias=True, group_size=32, bits=4)
    base.bias = mx.random.normal((48,)) * 0.1
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.1, (4, 64)).astype(np.float32)
    b = rng.normal(0, 0.1, (48, 4)).astype(np.float32)
    layer = kind(base, a, b, scale=2.0)
    if kind is DoRALinear:
        moved = mx.array(rng.uniform(0.5, 1.5, 48), dtype=mx.float32)
        layer.lora_magnitude_vector = layer.lora_magnitude_vector * moved
    layer.eval()
    x = mx.array(rng.normal(size=(3, 64)).astype(np.float32))
    expected = np.array(layer(x))
    fused = np.array(x @ layer.fused_weight().T + base.bias)
    np.testing.assert_allclose(fused, expected, atol=1e-4)
    assert not np.allclose(
        np.array(base(x)), expected, atol=1e-2
    )  # the adapter really changes the output


def test_full_fine_tune_refuses_a_quantized_model(quantized_llama, wikisql_small, tmp_path):
    with pytest.raises(UserError, match="fine_tune_type full .* quantized"):
        Session(
            make_config(quantized_llama, wikisql_small, tmp_path / "out", fine_tune_type="full")
        )


def test_quantize_flag_on_a_quantized_model_is_refused(quantized_llama, wikisql_small, tmp_path):
    with pytest.raises(UserError, match=r"already quantized \(4 bits\); drop quantize"):
        Session(make_config(quantized_llama, wikisql_small, tmp_path / "out", quantize=8))


def test_cli_quantize_flag(tiny_llama, wikisql_small, tmp_path):
    """`mlxft lora --quantize 4` end to end: the flag reaches the config, training runs, a PEFT
    adapter is saved."""
    import yaml
    from click.testing import CliRunner

    from mlxft.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"q_group_size": 32, "max_seq_length": 64, "val_batches": 1}))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "lora",
            "-c",
            str(config),
            "--train",
            "--model",
            str(tiny_llama),
            "--data",
            str(wikisql_small),
            "--quantize",
            "4",
            "--iters",
            "2",
            "--batch-size",
            "2",
            "--num-layers",
            "-1",
            "--adapter-path",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Iter 2: train loss" in result.output
    assert (out / "adapter_model.safetensors").is_file()
    assert yaml.safe_load((out / "mlxft_config.yaml").read_text())["quantize"] == 4


def test_torch_backend_refuses_quantized_mlx_models(
    quantized_llama, tiny_llama, wikisql_small, tmp_path
):
    pytest.importorskip("torch")
    with pytest.raises(
        UserError, match="4-bit quantized MLX model, which the torch backend cannot load.*--to-hf"
    ):
        Session(make_config(quantized_llama, wikisql_small, tmp_path / "a", backend="torch"))
    with pytest.raises(UserError, match="quantize .* only supported by the MLX backend"):
        Session(make_config(tiny_llama, wikisql_small, tmp_path / "b", backend="torch", quantize=4))
