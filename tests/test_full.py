"""Full fine-tuning (`fine_tune_type: full`): the real weights train (all, or the last
`num_layers` blocks), and `adapter_path` ends up holding a Hugging Face model directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxft.errors import UserError
from mlxft.training.session import Session
from tests.session_helpers import make_config, token_ids, train, train_losses

torch = pytest.importorskip("torch")


def _hf_logits(model_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def test_full_fine_tune_saves_a_model_transformers_loads(stories, wikisql_small, tmp_path):
    out = tmp_path / "full"
    ids = token_ids(512)
    before = _hf_logits(stories, ids)
    session = train(
        stories,
        wikisql_small,
        out,
        fine_tune_type="full",
        iters=8,
        learning_rate=2e-3,
        save_every=4,
    )
    losses = train_losses(out)
    assert losses[-1] < losses[0] - 0.2, losses
    assert session.last_val_loss < session.first_val_loss
    # the whole model trained: embeddings (tied to lm_head in stories260K) and norms included
    trainable = dict(tree_flatten(session.backend.model.trainable_parameters()))
    assert "model.embed_tokens.weight" in trainable and "model.norm.weight" in trainable
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "metrics.jsonl",
        "mlxft_config.yaml",
    } <= {f.name for f in out.iterdir()}
    assert not (out / "adapter_config.json").exists()
    saved = _hf_logits(out, ids)
    np.testing.assert_allclose(saved, session.backend.logits(ids), atol=1e-4)
    assert np.abs(saved - before).max() > 0.1  # and it is not the base model
    # the checkpoint at step 4 is a loadable model too, between the base and the final one
    checkpoint = out / "checkpoints" / "step-0000004"
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == "llama"
    mid = _hf_logits(checkpoint, ids)
    assert np.abs(mid - before).max() > 1e-3 and np.abs(mid - saved).max() > 1e-3


def test_partial_depth_trains_only_the_last_blocks(stories, wikisql_small, tmp_path):
    from safetensors.numpy import load_file

    out = tmp_path / "full2"
    session = train(
        stories,
        wikisql_small,
        out,
        fine_tune_type="full",
        num_layers=2,
        iters=3,
        learning_rate=2e-3,
    )
    trainable = {k for k, _ in tree_flatten(session.backend.model.trainable_parameters())}
    assert trainable and {k.split(".")[2] for k in trainable} == {"3", "4"}  # model.layers.N.…
    before, after = (
        load_file(str(stories / "model.safetensors")),
        load_file(str(out / "model.safetensors")),
    )
    assert set(after) == set(before)
    for name in before:
        moved = np.abs(before[name] - after[name]).max() > 0
        assert moved == name.startswith(("model.layers.3.", "model.layers.4.")), (
            name
        )  # embeddings stay frozen
    trained, total = session.backend.parameter_counts()
    assert 0 < trained < total


def test_full_output_is_not_an_adapter(stories, wikisql_small, tmp_path):
    out = tmp_path / "full3"
    train(stories, wikisql_small, out, fine_tune_type="full", iters=1)
    cfg = make_config(stories, wikisql_small, tmp_path / "lora", resume_adapter_file=str(out))
    with pytest.raises(UserError, match="holds a full model .* --model"):
        Session(cfg)


@pytest.mark.usefixtures("one_torch_thread")
def test_full_backends_agree(tiny_llama, tmp_path):
    """Per-step loss of MLX and torch full fine-tuning within 1e-3 over 10 steps (last block only:
    embeddings frozen), and the two saved models give the same logits."""
    from tests.conftest import WIKISQL

    losses, logits = {}, {}
    ids = token_ids(320)
    for backend in ("mlx", "torch"):
        out = tmp_path / backend
        session = train(
            tiny_llama,
            WIKISQL,
            out,
            fine_tune_type="full",
            num_layers=1,
            iters=10,
            backend=backend,
            learning_rate=1e-3,
        )
        losses[backend] = np.array(train_losses(out))
        logits[backend] = _hf_logits(out, ids)
        np.testing.assert_allclose(logits[backend], session.backend.logits(ids), atol=1e-4)
    assert len(losses["mlx"]) == 10 and losses["mlx"][-1] < losses["mlx"][0]
    np.testing.assert_allclose(losses["mlx"], losses["torch"], atol=1e-3)
    np.testing.assert_allclose(logits["mlx"], logits["torch"], atol=1e-3)


def test_cli_full_fine_tune(stories, wikisql_small, tmp_path):
    from click.testing import CliRunner

    from mlxft.cli import main

    out = tmp_path / "cli-full"
    result = CliRunner().invoke(
        main,
        [
            "lora",
            "--train",
            "--model",
            str(stories),
            "--data",
            str(wikisql_small),
            "--fine-tune-type",
            "full",
            "--num-layers",
            "2",
            "--iters",
            "2",
            "--batch-size",
            "2",
            "--max-seq-length",
            "64",
            "--val-batches",
            "1",
            "--adapter-path",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"Saved the full model to {out}" in result.output
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
