"""Adapter interop, checked with the other tools themselves: PEFT loads our adapters, mlx-lm loads
the exported ones, and both tools' own adapters import into ours with the same logits."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from mlxft.adapters.files import peft_key, save_adapter
from mlxft.cli import main
from tests.test_fuse import IDS, our_logits, small_data, train_adapter

KINDS = {
    "all": dict(lora={"rank": 4, "alpha": 8}),
    "last_block": dict(
        num_layers=1, lora={"rank": 4, "alpha": 12}
    ),  # exercises layers_to_transform
    "q_v": dict(lora={"rank": 2, "alpha": 6, "keys": ["q_proj", "v_proj"]}),
    "dora": dict(fine_tune_type="dora", lora={"rank": 4, "alpha": 8}),
}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    data = small_data(root)
    return {name: train_adapter(tiny_llama, data, root / name, **kw) for name, kw in KINDS.items()}


def peft_logits(base, adapter_dir) -> np.ndarray:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter_dir)
    )
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits[0].numpy()


def mlx_lm_logits(base, adapter_dir) -> np.ndarray:
    import mlx.core as mx
    from mlx_lm.utils import load

    model, _ = load(str(base), adapter_path=str(adapter_dir))
    return np.array(model(mx.array(IDS))[0].astype(mx.float32))


@pytest.mark.parametrize("kind", list(KINDS))
def test_peft_loads_our_adapter(tiny_llama, adapters, kind):
    ours = our_logits(tiny_llama, adapters[kind])
    assert np.abs(peft_logits(tiny_llama, adapters[kind]) - ours).max() < 1e-4
    assert np.abs(ours - our_logits(tiny_llama)).max() > 1e-2  # trained: B != 0
    config = json.loads((adapters[kind] / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == ([1] if kind == "last_block" else None)


@pytest.mark.parametrize("kind", list(KINDS))
def test_mlx_lm_loads_exported_adapter_and_round_trip_is_identical(
    tiny_llama, adapters, kind, tmp_path
):
    out = run(
        "export",
        "--adapter-path",
        adapters[kind],
        "--to",
        "mlx-lm",
        "--save-path",
        tmp_path / "mlx",
    )
    assert out.exit_code == 0, out.output
    assert sorted(p.name for p in (tmp_path / "mlx").iterdir()) == [
        "adapter_config.json",
        "adapters.safetensors",
    ]
    mlx_config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert mlx_config["num_layers"] == (1 if kind == "last_block" else -1)
    assert (
        np.abs(
            mlx_lm_logits(tiny_llama, tmp_path / "mlx") - our_logits(tiny_llama, adapters[kind])
        ).max()
        < 1e-4
    )

    back = run("import", tmp_path / "mlx", "--save-path", tmp_path / "back")
    assert back.exit_code == 0, back.output
    for name in ("adapter_config.json",):
        assert json.loads((tmp_path / "back" / name).read_text()) == json.loads(
            (adapters[kind] / name).read_text()
        )
    before = load_file(str(adapters[kind] / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
    assert before.keys() == after.keys() and all(
        np.array_equal(before[k], after[k]) for k in before
    )


def test_export_of_partial_depth_needs_the_block_count(adapters, tmp_path):
    src = tmp_path / "a"
    shutil.copytree(adapters["last_block"], src)
    config = json.loads((src / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someorg/not-cached"
    (src / "adapter_config.json").write_text(json.dumps(config))
    out = run("export", "--adapter-path", src, "--save-path", tmp_path / "mlx")
    assert (
        out.exit_code == 2 and "pass --model BASE" in out.stderr and not (tmp_path / "mlx").exists()
    )


def test_import_mlx_lm_own_adapter(tiny_llama, tmp_path):
    """An adapter made by mlx-lm's own code (keys unset = every linear of the last block)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    model, _ = load(str(tiny_llama))
    model.freeze()
    linear_to_lora_layers(model, 1, {"rank": 4, "scale": 5.0, "dropout": 0.0})
    rng = np.random.default_rng(0)
    for _, layer in model.named_modules():
        if hasattr(layer, "lora_b"):
            layer.lora_b = mx.array(rng.normal(0, 0.05, layer.lora_b.shape).astype(np.float32))
    src = tmp_path / "mlx_lm_adapter"
    src.mkdir()
    mx.save_safetensors(
        str(src / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters()))
    )
    (src / "adapter_config.json").write_text(
        json.dumps(
            {
                "model": str(tiny_llama),
                "fine_tune_type": "lora",
                "num_layers": 1,
                "lora_parameters": {"rank": 4, "scale": 5.0, "dropout": 0.0},
            }
        )
    )
    expected = np.array(model(mx.array(IDS))[0])

    # passed where a PEFT adapter is expected: the message says what to run
    refused = run("generate", "--model", tiny_llama, "--adapter-path", src, "--prompt", "hi")
    assert refused.exit_code == 2 and f"mlxft import {src}" in refused.stderr

    assert run("import", src, "--save-path", tmp_path / "ours").exit_code == 0
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (
        config["r"] == 4 and config["lora_alpha"] == 20.0 and config["layers_to_transform"] == [1]
    )
    assert np.abs(our_logits(tiny_llama, tmp_path / "ours") - expected).max() < 1e-4
    assert np.abs(peft_logits(tiny_llama, tmp_path / "ours") - expected).max() < 1e-4


@pytest.mark.parametrize("rslora", [False, True])
def test_import_peft_own_adapter(tiny_llama, tmp_path, rslora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "o_proj", "down_proj"],
        layers_to_transform=[0],
        init_lora_weights=False,
        use_rslora=rslora,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        expected = peft_model(torch.tensor(IDS)).logits[0].numpy()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    assert np.abs(our_logits(tiny_llama, tmp_path / "peft") - expected).max() < 1e-4  # used as is
    assert run("import", tmp_path / "peft", "--save-path", tmp_path / "ours").exit_code == 0
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert ours["layers_to_transform"] == [0] and ours["target_modules"] == [
        "down_proj",
        "o_proj",
        "q_proj",
    ]
    assert np.abs(our_logits(tiny_llama, tmp_path / "ours") - expected).max() < 1e-4


# ---------------------------------------------------------------------------- bad adapters
def _generate(model, adapter):
    return run("generate", "--model", model, "--adapter-path", adapter, "--prompt", "hi", "-m", 2)


def test_adapter_for_another_model_names_the_module(adapters, stories, tiny_llama, tmp_path):
    wrong_shape = _generate(stories, adapters["all"])  # tiny llama's MLP is 128 wide, stories' 172
    assert wrong_shape.exit_code == 2
    assert wrong_shape.stderr == (
        "Error: adapter module model.layers.0.mlp.down_proj lora_A has shape (4, 128), "
        "the model expects (4, 172)\n"
    )
    weights = load_file(str(adapters["q_v"] / "adapter_model.safetensors"))
    moved = {k.replace("layers.1.", "layers.7."): v for k, v in weights.items()}
    save_adapter(
        tmp_path / "deep", moved, json.loads((adapters["q_v"] / "adapter_config.json").read_text())
    )
    missing = _generate(tiny_llama, tmp_path / "deep")
    assert missing.exit_code == 2
    assert (
        "adapter module model.layers.7.self_attn.q_proj is not a linear module of this model"
        in missing.stderr
    )


def test_broken_adapter_dirs_are_one_line_errors(adapters, tiny_llama, tmp_path):
    (tmp_path / "empty").mkdir()
    out = _generate(tiny_llama, tmp_path / "empty")
    assert (
        out.exit_code == 2
        and "no adapter_config.json" in out.stderr
        and out.stderr.count("\n") == 1
    )

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(adapters["all"] / "adapter_config.json", pickled)
    torch.save({"x": torch.zeros(1)}, pickled / "adapter_model.bin")
    out = _generate(tiny_llama, pickled)
    assert out.exit_code == 2 and "adapter_model.bin is a pickle" in out.stderr

    half = tmp_path / "half"
    weights = load_file(str(adapters["q_v"] / "adapter_model.safetensors"))
    weights.pop(peft_key("model.layers.0.self_attn.v_proj", "lora_B"))
    save_adapter(half, weights, json.loads((adapters["q_v"] / "adapter_config.json").read_text()))
    out = _generate(tiny_llama, half)
    assert out.exit_code == 2 and "model.layers.0.self_attn.v_proj has no lora_B" in out.stderr

    full = tmp_path / "full_ft"
    save_file({"x": np.zeros(1, np.float32)}, str(tmp_path / "x.safetensors"))
    (tmp_path / "mlx_full").mkdir()
    shutil.copy(tmp_path / "x.safetensors", tmp_path / "mlx_full" / "adapters.safetensors")
    (tmp_path / "mlx_full" / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "full", "num_layers": -1})
    )
    out = run("import", tmp_path / "mlx_full", "--save-path", full)
    assert out.exit_code == 2 and "full fine-tune" in out.stderr and not full.exists()
