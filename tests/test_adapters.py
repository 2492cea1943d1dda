"""Backend-neutral adapter logic: target selection, seeded init, schedules, PEFT file layout."""

import json

import numpy as np
import pytest

from mlxft.adapters.files import adapter_config, load_adapter, peft_key, save_adapter, split_key
from mlxft.adapters.targets import LinearInfo, init_lora, plan_adapters
from mlxft.config import build_config
from mlxft.errors import UserError
from mlxft.training.schedule import learning_rate

LINEARS = [
    LinearInfo(f"model.layers.{i}.{name}", 64, 64)
    for i in range(4)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
]


def cfg(**kw):
    lora = kw.pop("lora", {})
    return build_config(None, kw, lora)


def test_last_num_layers_and_keys():
    plan = plan_adapters(
        LINEARS, 4, cfg(num_layers=2, lora={"keys": ["q_proj", "self_attn.v_proj"]})
    )
    assert [t.path for t in plan.targets] == [
        "model.layers.2.self_attn.q_proj",
        "model.layers.2.self_attn.v_proj",
        "model.layers.3.self_attn.q_proj",
        "model.layers.3.self_attn.v_proj",
    ]
    assert plan.layers == [2, 3] and plan.module_names == ["q_proj", "v_proj"]
    assert len(plan_adapters(LINEARS, 4, cfg(num_layers=-1)).targets) == 16


def test_unknown_key_lists_module_names():
    with pytest.raises(UserError, match="no linear module matches 'qkv'.*self_attn.q_proj"):
        plan_adapters(LINEARS, 4, cfg(lora={"keys": ["qkv"]}))


def test_init_is_seeded_per_module_and_peft_like():
    a1, b1 = init_lora("model.layers.0.self_attn.q_proj", 64, 32, 8, seed=0)
    a2, _ = init_lora("model.layers.0.self_attn.q_proj", 64, 32, 8, seed=0)
    a3, _ = init_lora("model.layers.0.self_attn.k_proj", 64, 32, 8, seed=0)
    a4, _ = init_lora("model.layers.0.self_attn.q_proj", 64, 32, 8, seed=1)
    assert a1.shape == (8, 64) and b1.shape == (32, 8) and not b1.any()
    assert np.array_equal(a1, a2) and not np.array_equal(a1, a3) and not np.array_equal(a1, a4)
    assert np.abs(a1).max() <= 1 / np.sqrt(64) and a1.dtype == np.float32


def test_schedules():
    sched = {
        "name": "cosine",
        "warmup": 10,
        "warmup_ratio": 0.0,
        "min_lr_ratio": 0.0,
        "warmup_init": 0.0,
    }
    lrs = [learning_rate(s, 1.0, sched, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.0, abs=1e-9)
    assert all(x >= y for x, y in zip(lrs[10:], lrs[11:]))
    lin = {**sched, "name": "linear", "warmup": 0, "warmup_ratio": 0.1}
    assert learning_rate(55, 1.0, lin, 101) == pytest.approx(0.5, abs=0.02)
    const = {**sched, "name": "constant", "warmup": 0}
    assert {learning_rate(s, 3e-4, const, 50) for s in range(50)} == {3e-4}


def test_peft_layout_round_trip(tmp_path):
    plan = plan_adapters(LINEARS, 4, cfg(num_layers=2, lora={"rank": 4, "alpha": 8}))
    weights = {}
    for path, (a, b) in plan.init.items():
        weights[peft_key(path, "lora_A")] = a
        weights[peft_key(path, "lora_B")] = b + 1
    save_adapter(tmp_path, weights, adapter_config(plan, "base"))
    config, loaded = load_adapter(tmp_path)
    assert (
        config["r"] == 4 and config["lora_alpha"] == 8 and config["layers_to_transform"] == [2, 3]
    )
    assert config["peft_type"] == "LORA" and config["target_modules"] == [
        "down_proj",
        "k_proj",
        "q_proj",
        "v_proj",
    ]
    key = "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
    assert key in loaded and loaded[key].shape == (4, 64)
    assert split_key(key) == ("model.layers.3.self_attn.q_proj", "lora_A")
    assert all(np.array_equal(loaded[k], v) for k, v in weights.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    json.loads((tmp_path / "adapter_config.json").read_text())


def test_load_adapter_errors(tmp_path):
    with pytest.raises(UserError, match="adapter directory not found"):
        load_adapter(tmp_path / "nope")
    with pytest.raises(UserError, match="no adapter_config.json"):
        load_adapter(tmp_path)
    (tmp_path / "adapters.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="mlx-lm adapter.*mlxft import"):
        load_adapter(tmp_path)
