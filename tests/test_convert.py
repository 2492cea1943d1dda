"""`mlxft convert`: HF <-> MLX round trips per family, quantization, atomic output, one-line
errors."""

import json
import os
from pathlib import Path

import mlx.core as mx  # noqa: E402  (after mlxft, which loads OpenBLAS)
import mlx.nn as nn  # noqa: E402
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

import mlxft.convert as convert
from mlxft.cli import main
from mlxft.errors import UserError
from mlxft.model_dir import save_hf_dir
from tests.tiny_models import FAMILIES

IDS = [[1, 17, 42, 99, 250, 7, 63, 128, 5, 300]]


def hf_weights(path: Path) -> dict:
    weights = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        weights.update(load_file(str(f)))
    return weights


def hf_logits(path: Path) -> np.ndarray:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().numpy()


def mlx_logits(path: Path):
    """Loaded by plain mlx-lm (no mlxft config fix-ups): the converted dir must stand on its own."""
    from mlx_lm.utils import load_model

    model, config = load_model(Path(path))
    return model, config, np.array(model(mx.array(IDS)).astype(mx.float32))


def leftovers(parent: Path) -> list:
    return [p.name for p in Path(parent).iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def round_trips(tiny_models, tmp_path_factory):
    """{family: (hf, mlx, hf_again)}: each tiny model converted to MLX and back once."""
    root = tmp_path_factory.mktemp("convert")
    out = {}
    for family, hf in tiny_models.items():
        mlx_dir = convert.to_mlx(hf, root / f"{family}-mlx")
        out[family] = (hf, mlx_dir, convert.to_hf(mlx_dir, root / f"{family}-hf"))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_lossless(round_trips, family):
    hf, _, back = round_trips[family]
    a, b = hf_weights(hf), hf_weights(back)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    np.testing.assert_allclose(hf_logits(back), hf_logits(hf), atol=1e-5, rtol=0)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
    ):
        assert (back / name).read_bytes() == (hf / name).read_bytes(), name
    config = json.loads((back / "config.json").read_text())
    assert "quantization" not in config and config["dtype"] == "float32"


@pytest.mark.parametrize("family", FAMILIES)
def test_mlx_logits_match_transformers(round_trips, family):
    hf, mlx_dir, _ = round_trips[family]
    _, _, logits = mlx_logits(mlx_dir)
    np.testing.assert_allclose(logits, hf_logits(hf), atol=1e-4, rtol=0)


def test_quantized_q4(tiny_llama, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "convert",
            "--hf-path",
            str(tiny_llama),
            "--mlx-path",
            str(tmp_path / "q4"),
            "-q",
            "--q-bits",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    model, config, logits = mlx_logits(tmp_path / "q4")
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    full = hf_logits(tiny_llama)
    assert np.corrcoef(logits.ravel(), full.ravel())[0, 1] > 0.9
    assert np.abs(logits - full).max() > 1e-4  # really quantized, not a copy

    back = convert.to_hf(tmp_path / "q4", tmp_path / "q4-hf")
    assert not any(k.endswith((".scales", ".biases")) for k in hf_weights(back))
    assert "quantization" not in json.loads((back / "config.json").read_text())
    # de-quantized weights in transformers compute what the quantized MLX model computes
    np.testing.assert_allclose(hf_logits(back), logits, atol=1e-3, rtol=0)


def test_stories_tied_embeddings_round_trip(stories, tmp_path):
    assert json.loads((stories / "config.json").read_text())["tie_word_embeddings"] is True
    mlx_dir = convert.to_mlx(stories, tmp_path / "mlx")
    back = convert.to_hf(mlx_dir, tmp_path / "hf")
    a, b = hf_weights(stories), hf_weights(back)
    assert sorted(a) == sorted(b) and "lm_head.weight" not in b
    assert all(np.array_equal(a[k], b[k]) for k in a)
    np.testing.assert_allclose(hf_logits(back), hf_logits(stories), atol=1e-5, rtol=0)
    np.testing.assert_allclose(mlx_logits(mlx_dir)[2], hf_logits(stories), atol=1e-4, rtol=0)
    assert (back / "tokenizer.model").read_bytes() == (stories / "tokenizer.model").read_bytes()


def test_dtype_option(stories, tmp_path):
    mlx_dir = convert.to_mlx(stories, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((mlx_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {v.dtype for v in mx.load(str(mlx_dir / "model.safetensors")).values()} == {mx.bfloat16}
    back = convert.to_hf(mlx_dir, tmp_path / "f16", dtype="float16")
    assert {v.dtype for v in hf_weights(back).values()} == {np.dtype("float16")}
    assert np.isfinite(hf_logits(back)).all()


def test_cli_to_hf(tiny_models, round_trips, tmp_path):
    _, mlx_dir, _ = round_trips["qwen2"]
    out = tmp_path / "qwen2-hf"
    result = CliRunner().invoke(
        main, ["convert", "--to-hf", "--mlx-path", str(mlx_dir), "--hf-path", str(out)]
    )
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(hf_logits(out), hf_logits(tiny_models["qwen2"]), atol=1e-5, rtol=0)


def test_save_hf_dir_shards_and_copies(tiny_llama, tmp_path):
    weights = hf_weights(tiny_llama)  # numpy arrays, as fuse may pass them
    config = json.loads((tiny_llama / "config.json").read_text())
    out = save_hf_dir(weights, config, tiny_llama, tmp_path / "sharded", max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and sorted(index["weight_map"]) == sorted(weights)
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    np.testing.assert_allclose(hf_logits(out), hf_logits(tiny_llama), atol=1e-5, rtol=0)
    assert leftovers(tmp_path) == []


def test_save_hf_dir_refuses_unknown_names_atomically(tiny_llama, tmp_path):
    weights = hf_weights(tiny_llama)
    weights["model.layers.0.mlp.gate_up_proj.weight"] = weights.pop(
        "model.layers.0.mlp.gate_proj.weight"
    )
    config = json.loads((tiny_llama / "config.json").read_text())
    with pytest.raises(UserError, match="gate_up_proj"):
        save_hf_dir(weights, config, tiny_llama, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_crash_mid_write_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    import mlxft.convert.hf_to_mlx as h2m

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(h2m, "copy_aux_files", boom)
    with pytest.raises(KeyboardInterrupt):
        convert.to_mlx(tiny_llama, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_destination_exists_is_refused(tiny_llama, tmp_path):
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        convert.to_mlx(tiny_llama, dest)
    with pytest.raises(UserError, match="already exists"):
        convert.to_hf(tiny_llama, dest)
    assert [p.name for p in tmp_path.iterdir()] == ["taken"] and os.listdir(dest) == ["keep.txt"]
    (tmp_path / "empty").mkdir()  # an empty directory is fine (e.g. made by a job scheduler)
    assert (convert.to_mlx(tiny_llama, tmp_path / "empty") / "model.safetensors").is_file()


def test_pickle_only_refused_unless_allowed(tiny_llama, tmp_path):
    src = tmp_path / "pickled"
    src.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (src / name).write_bytes((tiny_llama / name).read_bytes())
    torch.save(
        {k: torch.from_numpy(v) for k, v in hf_weights(tiny_llama).items()},
        src / "pytorch_model.bin",
    )
    with pytest.raises(UserError, match="pickle"):
        convert.to_mlx(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    out = convert.to_mlx(src, tmp_path / "out", allow_pickle=True)
    np.testing.assert_allclose(mlx_logits(out)[2], hf_logits(tiny_llama), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["-q", "--q-bits", "7"], "--q-bits 7: not supported"),
        (["-q", "--q-group-size", "48"], "--q-group-size 48: not supported"),
        (["--dtype", "float64"], "--dtype float64: not supported"),
    ],
)
def test_cli_bad_options(tiny_llama, tmp_path, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["convert", "--hf-path", str(tiny_llama), "--mlx-path", str(out), *args]
    )
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_input_errors(tmp_path, monkeypatch):
    runner = CliRunner()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text('{"model_type": "llama"}')
    torch.save({"w": torch.zeros(2)}, pickled / "pytorch_model.bin")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = [
        (["--hf-path", str(tmp_path / "missing")], "model directory not found"),
        (["--hf-path", str(pickled)], "only pickle weights"),
        (["--hf-path", "nobody-xyz/not-cached-anywhere"], "HF_HUB_OFFLINE=1"),
        (
            ["--to-hf", "--mlx-path", str(tmp_path / "missing"), "--hf-path", str(tmp_path / "o")],
            "not found",
        ),
        (["--to-hf", "--mlx-path", str(pickled)], "--to-hf needs"),
    ]
    for args, message in cases:
        result = runner.invoke(main, ["convert", "--mlx-path", str(tmp_path / "out"), *args])
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], (
            args,
            lines,
        )
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_config_without_tie_flag_keeps_lm_head(tiny_llama, tmp_path):
    """transformers' llama defaults to untied, mlx-lm's to tied: an omitted flag must not drop
    lm_head."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    config = json.loads((src / "config.json").read_text())
    del config["tie_word_embeddings"]
    (src / "config.json").write_text(json.dumps(config))
    mlx_dir = convert.to_mlx(src, tmp_path / "mlx")
    assert json.loads((mlx_dir / "config.json").read_text())["tie_word_embeddings"] is False
    np.testing.assert_allclose(mlx_logits(mlx_dir)[2], hf_logits(tiny_llama), atol=1e-4, rtol=0)
