"""Exact resume: a run killed (SIGKILL) or interrupted (SIGINT) and resumed with --resume gives
the per-step losses of an uninterrupted run; incompatible resumes are refused in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mlxft.cli import main

ITERS, SAVE_EVERY = 20, 4
RUN = [sys.executable, "-c", "from mlxft.cli import main; main()"]


def lora_args(model, data, out, backend="mlx", *extra):
    """16 batches per epoch, so every run below crosses an epoch boundary."""
    return [
        "lora",
        "--train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--adapter-path",
        str(out),
        "--backend",
        backend,
        "--iters",
        str(ITERS),
        "--save-every",
        str(SAVE_EVERY),
        "--steps-per-report",
        "1",
        "--steps-per-eval",
        "10",
        "--val-batches",
        "1",
        "--batch-size",
        "4",
        "--max-seq-length",
        "96",
        "--num-layers",
        "-1",
        "--learning-rate",
        "2e-3",
        "--lr-schedule",
        "cosine",
        "--warmup",
        "3",
        "--dropout",
        "0.1",
        *extra,
    ]


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def losses(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        (r["step"], key): r[key] for r in rows for key in ("train_loss", "val_loss") if key in r
    }


def backend_ready(name: str):
    if name == "torch":
        pytest.importorskip("torch")
        from mlxft.torch_backend import TorchBackend

        if not hasattr(TorchBackend, "optimizer_state"):
            pytest.skip("mlxft.torch_backend.TorchBackend does not implement optimizer_state yet")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tests.conftest import WIKISQL

    out = tmp_path_factory.mktemp("resume_data")
    lines = (WIKISQL / "train.jsonl").read_text().splitlines()
    (out / "train.jsonl").write_text("\n".join(lines[:64]) + "\n")
    (out / "valid.jsonl").write_text("\n".join(lines[64:68]) + "\n")
    return out


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, data):
    """A finished 5-step run with a step-4 checkpoint; tests copy it."""
    from tests.conftest import STORIES

    out = tmp_path_factory.mktemp("short") / "run"
    result = cli(*lora_args(STORIES, data, out, "mlx", "--iters", "5"))
    assert result.exit_code == 0, result.output
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """The uninterrupted run, once per backend."""
    from tests.conftest import STORIES

    runs = {}

    def get(backend):
        if backend not in runs:
            out = tmp_path_factory.mktemp(f"reference_{backend}")
            result = cli(*lora_args(STORIES, data, out, backend))
            assert result.exit_code == 0, result.output
            runs[backend] = out
        return runs[backend]

    return get


def start(args, env_extra=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env_extra or {}))
    return subprocess.Popen(
        RUN + [str(a) for a in args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for_step(proc, out: Path, step: int, timeout: float = 120.0) -> None:
    """Poll (bounded) until the step-`SAVE_EVERY` checkpoint exists and metrics.jsonl is past
    `step`."""
    deadline = time.monotonic() + timeout
    checkpoint = out / "checkpoints" / f"step-{SAVE_EVERY:07d}" / "trainer_state.json"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"the run ended (status {proc.returncode}) before it could be interrupted: "
                f"{proc.stderr.read()[-2000:]}"
            )
        metrics = out / "metrics.jsonl"
        if checkpoint.is_file() and metrics.is_file():
            steps = [
                json.loads(line).get("step", 0)
                for line in metrics.read_text().splitlines()
                if line.endswith("}")
            ]
            if steps and max(steps) > step:
                return
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"no step {step} within {timeout}s")


def assert_same_run(reference: Path, resumed: Path) -> None:
    ref, got = losses(reference), losses(resumed)
    assert sorted(ref) == sorted(got), "the resumed run reports different steps"
    assert sum(1 for _, kind in got if kind == "train_loss") == ITERS
    for key in ref:
        assert abs(ref[key] - got[key]) <= 1e-5, (
            f"{key}: {ref[key]} uninterrupted vs {got[key]} resumed"
        )
    from mlxft.adapters.files import load_adapter

    _, a = load_adapter(reference)
    _, b = load_adapter(resumed)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-5)


@pytest.mark.parametrize("backend", ["mlx", pytest.param("torch", marks=pytest.mark.slow)])
def test_sigkill_then_resume_matches_uninterrupted(backend, stories, data, reference, tmp_path):
    backend_ready(backend)
    out = tmp_path / "run"
    proc = start(lora_args(stories, data, out, backend))
    wait_for_step(proc, out, SAVE_EVERY)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "adapter_model.safetensors").exists()
    result = cli(*lora_args(stories, data, out, backend, "--resume"))
    assert result.exit_code == 0, result.output
    assert "Resuming from" in result.output
    assert_same_run(reference(backend), out)
    # what the run wrote stays inside adapter_path, under names of our own
    names = {p.name for p in out.iterdir()}
    assert names <= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "mlxft_config.yaml",
        "checkpoints",
    }


def test_sigint_saves_a_checkpoint_and_says_how_to_resume(stories, data, reference, tmp_path):
    out = tmp_path / "run"
    proc = start(lora_args(stories, data, out))
    wait_for_step(proc, out, SAVE_EVERY + 1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    line = next(line for line in stderr.splitlines() if line.startswith("Interrupted at step"))
    step = int(line.split()[3].rstrip(":"))
    assert step > SAVE_EVERY
    assert f"mlxft lora --config {out / 'mlxft_config.yaml'} --resume" in line
    assert (out / "checkpoints" / f"step-{step:07d}" / "trainer_state.json").is_file()
    assert not (
        out / "adapter_model.safetensors"
    ).exists()  # the final adapter is for finished runs
    # the printed command continues the run exactly
    result = cli("lora", "--config", out / "mlxft_config.yaml", "--resume")
    assert result.exit_code == 0, result.output
    assert f"at step {step} " in result.output
    assert_same_run(reference("mlx"), out)


def test_resume_from_an_older_checkpoint_rewinds_the_run(stories, data, reference, tmp_path):
    """--resume-from step 4 of a finished run: later checkpoints and metrics are replaced."""
    out = tmp_path / "run"
    args = lora_args(stories, data, out, "mlx", "--keep-checkpoints", "10")
    assert cli(*args).exit_code == 0
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == [f"step-{s:07d}" for s in range(SAVE_EVERY, ITERS, SAVE_EVERY)]
    result = cli(*args, "--resume-from", out / "checkpoints" / f"step-{SAVE_EVERY:07d}")
    assert result.exit_code == 0, result.output
    assert f"removed {len(steps) - 1} later checkpoint(s)" in result.output
    assert_same_run(reference("mlx"), out)


def test_full_fine_tune_resumes_exactly(tiny_llama, data, tmp_path):
    """A full fine-tune's checkpoint is a model directory; resuming loads the weights from it."""
    args = [
        "lora",
        "--train",
        "--model",
        tiny_llama,
        "--data",
        data,
        "--fine-tune-type",
        "full",
        "--iters",
        "6",
        "--save-every",
        "3",
        "--steps-per-report",
        "1",
        "--val-batches",
        "1",
        "--batch-size",
        "2",
        "--max-seq-length",
        "64",
        "--learning-rate",
        "1e-3",
        "--num-layers",
        "-1",
    ]
    assert cli(*args, "--adapter-path", tmp_path / "ref").exit_code == 0
    out = tmp_path / "run"
    assert cli(*args, "--adapter-path", out, "--iters", "6").exit_code == 0
    result = cli(
        *args, "--adapter-path", out, "--resume-from", out / "checkpoints" / "step-0000003"
    )
    assert result.exit_code == 0, result.output
    ref, got = losses(tmp_path / "ref"), losses(out)
    assert sorted(ref) == sorted(got)
    for key in ref:
        assert abs(ref[key] - got[key]) <= 1e-5, key


def test_keep_checkpoints_and_fresh_runs_move_old_ones_aside(stories, data, tmp_path):
    out = tmp_path / "run"
    assert cli(*lora_args(stories, data, out, "mlx", "--keep-checkpoints", "2")).exit_code == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-0000012",
        "step-0000016",
    ]
    result = cli(*lora_args(stories, data, out, "mlx", "--iters", "3"))
    assert result.exit_code == 0, result.output
    assert f"moved the earlier run in {out}" in result.output
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())
    (previous,) = (out / "previous-runs").iterdir()
    assert sorted(p.name for p in (previous / "checkpoints").iterdir()) == [
        "step-0000012",
        "step-0000016",
    ]


@pytest.mark.parametrize(
    "change, message",
    [
        (["--batch-size", "2"], "batch_size is 2, the checkpoint has 4"),
        (["--rank", "4"], "lora_parameters.rank is 4, the checkpoint has 8"),
        (["--max-seq-length", "64"], "max_seq_length is 64, the checkpoint has 96"),
        (["--seed", "1"], "seed is 1, the checkpoint has 0"),
    ],
)
def test_incompatible_resume_is_refused(stories, data, short_run, tmp_path, change, message):
    out = copy_of(short_run, tmp_path)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = cli(*lora_args(stories, data, out, "mlx", "--iters", "5", "--resume", *change))
    assert result.exit_code == 2
    assert result.output.startswith("Error: cannot resume from ") and message in result.output
    assert "--resume-adapter-file" in result.output and len(result.output.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_with_other_data_or_model_is_refused(stories, tiny_llama, data, short_run, tmp_path):
    out = copy_of(short_run, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    lines = (data / "train.jsonl").read_text().splitlines()
    (other / "train.jsonl").write_text("\n".join(lines[1:]) + "\n")
    (other / "valid.jsonl").write_text((data / "valid.jsonl").read_text())
    result = cli(*lora_args(stories, other, out, "mlx", "--iters", "5", "--resume"))
    assert result.exit_code == 2 and "the training data differs" in result.output
    # a different base model (its tokenizer also changes the data)
    result = cli(*lora_args(tiny_llama, data, out, "mlx", "--iters", "5", "--resume"))
    assert result.exit_code == 2 and "the model differs" in result.output


def test_schedule_change_is_allowed_with_a_notice(stories, data, short_run, tmp_path):
    out = copy_of(short_run, tmp_path)
    result = cli(*lora_args(stories, data, out, "mlx", "--iters", "8", "--resume"))
    assert result.exit_code == 0, result.output
    assert "resuming with iters is 8, the checkpoint has 5" in result.output
    assert max(k[0] for k in losses(out)) == 8


def test_optimizer_state_round_trip_and_layout(stories, data, tmp_path):
    """Flat PEFT-keyed state: export -> import into a fresh optimizer -> export is identical."""
    from mlxft.config import build_config
    from mlxft.training.session import Session

    for optimizer, slots in (("adamw", {"exp_avg", "exp_avg_sq"}), ("sgd", {"momentum_buffer"})):
        extra = {"optimizer_config": {"sgd": {"momentum": 0.9}}} if optimizer == "sgd" else {}
        cfg = build_config(
            overrides=dict(
                model=str(stories),
                data=str(data),
                adapter_path=str(tmp_path / optimizer),
                train=True,
                iters=2,
                batch_size=4,
                max_seq_length=64,
                val_batches=1,
                optimizer=optimizer,
                num_layers=2,
                **extra,
            )
        )
        session = Session(cfg, reporter_quiet=True)
        session.train()
        state = session.backend.optimizer_state()
        assert int(state["step"][0]) == 2
        params = set(session.backend.adapter_weights())
        assert {k for k in state if k != "step"} == {f"{p}.{s}" for p in params for s in slots}
        fresh = Session(cfg, reporter_quiet=True)
        fresh.backend.setup_training(cfg)
        fresh.backend.load_optimizer_state(state)
        again = fresh.backend.optimizer_state()
        assert again.keys() == state.keys()
        for key in state:
            np.testing.assert_array_equal(again[key], state[key])


def test_rng_state_round_trip(stories, data, tmp_path):
    import mlx.core as mx

    from mlxft.config import build_config
    from mlxft.mlx_backend import MLXBackend

    backend = MLXBackend(build_config(overrides={}))
    saved = backend.rng_state()
    first = np.array(mx.random.uniform(shape=(4,)))
    backend.set_rng_state(saved)
    np.testing.assert_array_equal(np.array(mx.random.uniform(shape=(4,))), first)


def test_position_continues_across_the_epoch_boundary(stories, data):
    from mlxft.config import build_config
    from mlxft.data import load_splits
    from mlxft.hub import load_tokenizer
    from mlxft.training.checkpoint import Position
    from mlxft.training.session import batch_stream as _batches

    cfg = build_config(
        overrides=dict(model=str(stories), data=str(data), batch_size=4, max_seq_length=96)
    )
    split = load_splits(cfg, load_tokenizer(stories, cfg))["train"]
    whole = _batches(split, cfg, 0, Position())
    straight = [next(whole) for _ in range(20)]
    pos = Position(epoch=0, index=16)  # where a checkpoint after the epoch's last batch stands
    resumed = _batches(split, cfg, 0, pos)
    for expected in straight[16:]:
        np.testing.assert_array_equal(next(resumed).inputs, expected.inputs)
    assert (pos.epoch, pos.index) == (1, 4)


def test_resume_errors(stories, data, tmp_path):
    out = tmp_path / "run"
    result = cli(*lora_args(stories, data, out, "mlx", "--resume"))
    assert result.exit_code == 2 and "--resume: no checkpoint in" in result.output
    assert not out.exists()
    result = cli(*lora_args(stories, data, out, "mlx", "--resume-from", data))
    assert result.exit_code == 2 and "is not an mlxft checkpoint" in result.output


def test_help_separates_resume_from_resume_adapter_file():
    text = CliRunner().invoke(main, ["lora", "--help"]).output
    assert "--resume-adapter-file" in text and "NEW run" in text
    assert (
        "--resume " in text
        and "--resume-from" in text
        and "--dry-run" in text
        and "--revision" in text
    )
