"""The MLX LoRA trainer end to end: real models, real data, real files."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from mlxft.cli import main
from mlxft.config import build_config
from mlxft.data import make_batch
from mlxft.training.session import Session

CONTRACT = {
    "step",
    "learning_rate",
    "tokens_per_second",
    "iterations_per_second",
    "trained_tokens",
    "peak_memory_gb",
}


def session(model, data, out, **kw):
    lora = kw.pop("lora", {"rank": 4, "alpha": 8})
    base = dict(
        model=str(model),
        data=str(data),
        train=True,
        iters=12,
        batch_size=4,
        num_layers=-1,
        learning_rate=1e-2,
        adapter_path=str(out),
        steps_per_report=4,
        steps_per_eval=6,
        val_batches=-1,
        max_seq_length=128,
    )
    base.update(kw)
    return Session(build_config(None, base, lora), reporter_quiet=True)


def read_metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "phi3"])
def test_lora_trains_each_family(tiny_models, wikisql_small, tmp_path, family):
    s = session(tiny_models[family], wikisql_small, tmp_path / "out")
    s.train()
    records = read_metrics(tmp_path / "out")
    vals = [r for r in records if "val_loss" in r]
    trains = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in vals] == [0, 6, 12]
    assert [r["step"] for r in trains] == [4, 8, 12]
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] - 0.3, vals
    for r in records:
        assert set(r) >= CONTRACT, r
    assert trains[-1]["trained_tokens"] > 0 and trains[-1]["tokens_per_second"] > 0
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "mlxft_config.yaml",
    } <= files


def test_loss_is_mean_ce_over_unmasked_targets(tiny_llama, wikisql_small, tmp_path):
    s = session(tiny_llama, wikisql_small, tmp_path / "o")
    seqs = s.splits["valid"].sequences[:3]
    masks = [np.ones(len(x), bool) for x in seqs]
    masks[0][: len(seqs[0]) // 2] = False  # a prompt part that must not count
    batch = make_batch(seqs, masks, s.pad_id)
    total, count = s.backend.eval_loss([batch])
    logits = s.backend.logits(batch.inputs).astype(np.float64)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    ce = -np.take_along_axis(logp, batch.targets[..., None], -1)[..., 0]
    assert count == int(batch.mask.sum())
    assert total / count == pytest.approx((ce * batch.mask).sum() / batch.mask.sum(), rel=1e-5)


def test_grad_accumulation_equals_one_big_batch(tiny_llama, wikisql_small, tmp_path):
    seqs = None
    results = []
    for groups in ("split", "whole"):
        s = session(tiny_llama, wikisql_small, tmp_path / groups, lora={"rank": 4, "alpha": 8})
        s.backend.setup_training(s.cfg)
        seqs = s.splits["train"].sequences[:4]
        masks = [np.ones(len(x), bool) for x in seqs]
        if groups == "split":
            batches = [
                make_batch(seqs[:2], masks[:2], s.pad_id),
                make_batch(seqs[2:], masks[2:], s.pad_id),
            ]
        else:
            batches = [make_batch(seqs, masks, s.pad_id)]
        total, count = s.backend.train_step(batches, 1e-2)[:2]
        results.append((total, count, s.backend.adapter_weights()))
    (t1, c1, w1), (t2, c2, w2) = results
    assert c1 == c2 and t1 == pytest.approx(t2, rel=1e-5)
    assert max(np.abs(w1[k] - w2[k]).max() for k in w1) < 1e-5


def test_grad_checkpoint_same_losses(tiny_llama, wikisql_small, tmp_path):
    losses = []
    for ckpt in (False, True):
        s = session(
            tiny_llama,
            wikisql_small,
            tmp_path / str(ckpt),
            iters=4,
            steps_per_report=1,
            grad_checkpoint=ckpt,
        )
        s.train()
        losses.append(
            [r["train_loss"] for r in read_metrics(tmp_path / str(ckpt)) if "train_loss" in r]
        )
    np.testing.assert_allclose(losses[0], losses[1], atol=1e-5)


def test_partial_depth_and_reload_gives_same_loss(tiny_llama, wikisql_small, tmp_path):
    out = tmp_path / "out"
    s = session(
        tiny_llama,
        wikisql_small,
        out,
        num_layers=1,
        lora={"rank": 4, "alpha": 8, "keys": ["q_proj", "v_proj"]},
    )
    s.train()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1] and config["target_modules"] == ["q_proj", "v_proj"]
    assert all(".layers.1." in k for k in s.backend.adapter_weights())
    last_val = [r for r in read_metrics(out) if "val_loss" in r][-1]["val_loss"]
    # evaluating with the saved adapter (no --train) reproduces the final validation loss
    again = Session(
        build_config(
            None,
            dict(
                model=str(tiny_llama),
                data=str(wikisql_small),
                test=True,
                adapter_path=str(out),
                num_layers=1,
                max_seq_length=128,
            ),
            {"rank": 4, "alpha": 8, "keys": ["q_proj", "v_proj"]},
        ),
        reporter_quiet=True,
    )
    total, count = again.backend.eval_loss(
        __import__("mlxft.data", fromlist=["eval_batches"]).eval_batches(
            again.splits["valid"], 4, again.pad_id
        )
    )
    assert total / count == pytest.approx(last_val, rel=1e-5)


def test_cli_train_then_test(stories, wikisql_small, tmp_path):
    out = tmp_path / "adapters"
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "lora",
            "--train",
            "--test",
            "--model",
            str(stories),
            "--data",
            str(wikisql_small),
            "--iters",
            "10",
            "--num-layers",
            "-1",
            "--learning-rate",
            "3e-3",
            "--rank",
            "8",
            "--adapter-path",
            str(out),
            "--steps-per-report",
            "5",
            "--steps-per-eval",
            "10",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (
        "BLAS:" in result.output
        and "padding" in result.output
        and "Trainable parameters" in result.output
    )
    assert "Iter 0: Val loss" in result.output and "Iter 10: train loss" in result.output
    test_line = [line for line in result.output.splitlines() if line.startswith("Test loss")]
    assert len(test_line) == 1 and "Test ppl" in test_line[0]


def test_cli_bad_inputs_write_nothing(tiny_llama, wikisql_small, tmp_path):
    runner = CliRunner()
    out = tmp_path / "never"
    result = runner.invoke(
        main,
        [
            "lora",
            "--train",
            "--model",
            str(tmp_path / "missing"),
            "--data",
            str(wikisql_small),
            "--adapter-path",
            str(out),
        ],
    )
    assert (
        result.exit_code == 2 and "model directory not found" in result.output and not out.exists()
    )
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    result = runner.invoke(
        main,
        [
            "lora",
            "--train",
            "--model",
            str(incomplete),
            "--data",
            str(wikisql_small),
            "--adapter-path",
            str(out),
        ],
    )
    assert (
        result.exit_code == 2 and "no *.safetensors weights" in result.output and not out.exists()
    )
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = runner.invoke(
        main,
        [
            "lora",
            "--train",
            "--model",
            str(tiny_llama),
            "--data",
            str(wikisql_small),
            "--adapter-path",
            str(blocker / "sub"),
        ],
    )
    assert result.exit_code == 2 and "cannot be created" in result.output
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        result = runner.invoke(
            main,
            [
                "lora",
                "--train",
                "--model",
                str(tiny_llama),
                "--data",
                str(wikisql_small),
                "--adapter-path",
                str(ro / "a"),
            ],
        )
        assert result.exit_code == 2 and "not writable" in result.output


def test_fresh_run_replaces_metrics(stories, wikisql_small, tmp_path):
    out = tmp_path / "out"
    for _ in range(2):
        session(stories, wikisql_small, out, iters=4, steps_per_report=2, steps_per_eval=4).train()
    steps = [r["step"] for r in read_metrics(out)]
    assert steps == [0, 2, 4, 4], steps  # one run's curve, not two appended


def test_grad_checkpoint_stays_on_its_model_spares_the_last_block_and_refuses_dropout(
    tiny_llama, wikisql_small, tmp_path
):
    from mlxft.errors import UserError

    s = session(tiny_llama, wikisql_small, tmp_path / "a", grad_checkpoint=True)
    s.backend.setup_training(s.cfg)
    other = session(tiny_llama, wikisql_small, tmp_path / "b")
    names = [type(block).__name__ for block in s.backend.model.layers]
    assert len(names) >= 2 and all(n.startswith("Checkpointed") for n in names[:-1])
    assert not names[-1].startswith("Checkpointed")  # the last block's activations are used at once
    assert not type(other.backend.model.layers[0]).__name__.startswith(
        "Checkpointed"
    )  # no class-wide patch
    # refused by the config layer, before any model loads (it was the MLX backend's check)
    with pytest.raises(UserError, match="grad_checkpoint with lora_parameters.dropout > 0"):
        session(
            tiny_llama,
            wikisql_small,
            tmp_path / "c",
            grad_checkpoint=True,
            lora={"rank": 4, "alpha": 8, "dropout": 0.1},
        )
