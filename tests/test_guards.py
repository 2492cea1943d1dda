"""Guarded training: non-finite loss, out of memory and Ctrl-C stop a run in one clear line,
keeping the last good checkpoint and never writing diverged weights as the adapter."""

from __future__ import annotations

import math
import os
import signal

import pytest
from click.testing import CliRunner

from mlxft.cli import main
from mlxft.errors import UserError
from mlxft.mlx_backend import MLXBackend
from mlxft.training import guards


def run(model, data, out, *extra):
    args = [
        "lora",
        "--train",
        "--model",
        model,
        "--data",
        data,
        "--adapter-path",
        out,
        "--iters",
        "8",
        "--batch-size",
        "2",
        "--max-seq-length",
        "64",
        "--val-batches",
        "1",
        "--steps-per-report",
        "1",
        "--num-layers",
        "-1",
        "--save-every",
        "2",
        *extra,
    ]
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_huge_learning_rate_stops_on_non_finite_loss(stories, wikisql_small, tmp_path):
    out = tmp_path / "out"
    line = one_error_line(
        run(stories, wikisql_small, out, "--learning-rate", "1e30", "--optimizer", "sgd")
    )
    assert "became non-finite" in line and "a lower learning_rate (now 1e+30)" in line
    assert "grad_clip" in line and "check the data" in line
    assert not (
        out / "adapter_model.safetensors"
    ).exists()  # diverged weights are never the adapter
    step = int(line.split("step ")[1].split(":")[0])
    if step > 2:
        assert f"last good checkpoint: {out / 'checkpoints'}" in line


def test_injected_nan_keeps_the_last_good_checkpoint(stories, wikisql_small, tmp_path, monkeypatch):
    real = MLXBackend.train_step
    calls = {"n": 0}

    def poisoned(self, batches, lr, stop=False):
        calls["n"] += 1
        sums = real(self, batches, lr, stop)
        return sums._replace(loss_sum=math.nan) if calls["n"] == 5 else sums

    monkeypatch.setattr(MLXBackend, "train_step", poisoned)
    out = tmp_path / "out"
    line = one_error_line(
        run(stories, wikisql_small, out, "--learning-rate", "1e-3", "--grad-clip", "1.0")
    )
    checkpoint = out / "checkpoints" / "step-0000004"
    assert line.startswith("Error: step 5: the loss became non-finite (loss nan, gradient norm ")
    assert f"last good checkpoint: {checkpoint}" in line and "lower grad_clip (now 1)" in line
    assert (checkpoint / "trainer_state.json").is_file()
    assert not (out / "adapter_model.safetensors").exists()
    rows = (out / "metrics.jsonl").read_text()
    assert "NaN" not in rows  # metrics.jsonl stays valid JSON


def test_out_of_memory_is_explained_with_knobs(stories, wikisql_small, tmp_path, monkeypatch):
    def oom(self, batches, lr, stop=False):
        raise RuntimeError(
            "[metal::malloc] Attempting to allocate 68719476736 bytes which is greater than the "
            "maximum allowed buffer size of 28991029248 bytes."
        )

    monkeypatch.setattr(MLXBackend, "train_step", oom)
    line = one_error_line(run(stories, wikisql_small, tmp_path / "out", "--batch-size", "4"))
    assert line.startswith("Error: out of memory ([metal::malloc] Attempting to allocate")
    for knob in (
        "batch_size (now 4",
        "max_seq_length (now 64",
        "num_layers (now -1)",
        "lora_parameters.rank (now 8)",
        "grad_checkpoint",
        "--quantize 4",
        "--dry-run",
        "planned peak ~",
    ):
        assert knob in line


def test_other_runtime_errors_are_not_disguised(stories, wikisql_small, tmp_path, monkeypatch):
    def broken(self, batches, lr, stop=False):
        raise RuntimeError("shape mismatch in matmul")

    monkeypatch.setattr(MLXBackend, "train_step", broken)
    result = run(stories, wikisql_small, tmp_path / "out")
    assert isinstance(result.exception, RuntimeError) and "shape mismatch" in str(result.exception)


@pytest.mark.parametrize(
    "message",
    [
        "[metal::malloc] Resource limit (499000) exceeded",
        "MPS backend out of memory",
        "CUDA out of memory. Tried to allocate 2.00 GiB",
        "Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)",
        "std::bad_alloc",
    ],
)
def test_out_of_memory_messages_are_recognised(message):
    assert guards.is_out_of_memory(RuntimeError(message))
    assert not guards.is_out_of_memory(RuntimeError("index out of range"))


def test_check_finite_passes_finite_values():
    guards.check_finite(3, 1.5, 0.2, 1e-4, None, None)
    with pytest.raises(UserError, match="gradient norm became non-finite"):
        from mlxft.config import build_config

        guards.check_finite(3, 1.5, math.inf, 1e-4, build_config(overrides={}), None)


def test_first_ctrl_c_asks_to_stop_second_interrupts():
    before = signal.getsignal(signal.SIGINT)
    with guards.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
