"""Guarded training: non-finite loss, out of memory and Ctrl-C stop a run in one clear line,
keeping the last good checkpoint and never writing diverged weights as the adapter."""

from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
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


def test_injected_nan_discards_the_checkpoint_it_condemns(
    stories, wikisql_small, tmp_path, monkeypatch
):
    """Step 5's loss is computed with the weights step 4 left, the ones checkpoint step-4
    holds: a non-finite loss there condemns that checkpoint, and step-2 is the last good one."""
    real = MLXBackend.train_step
    calls = {"n": 0}

    def poisoned(self, batches, lr, stop=False):
        calls["n"] += 1
        result = real(self, batches, lr, stop)
        return result._replace(loss_sum=math.nan) if calls["n"] == 5 else result

    monkeypatch.setattr(MLXBackend, "train_step", poisoned)
    out = tmp_path / "out"
    line = one_error_line(
        run(stories, wikisql_small, out, "--learning-rate", "1e-3", "--grad-clip", "1.0")
    )
    good = out / "checkpoints" / "step-0000002"
    assert line.startswith("Error: step 5: the loss became non-finite (loss nan, gradient norm ")
    assert f"last good checkpoint: {good}" in line and "lower grad_clip (now 1)" in line
    assert (good / "trainer_state.json").is_file()
    assert not (out / "checkpoints" / "step-0000004").exists()
    assert not (out / "adapter_model.safetensors").exists()
    for row in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(row, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))


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


def test_check_step_passes_finite_values():
    from mlxft.config import build_config
    from mlxft.training.session import Step

    cfg = build_config(overrides={})
    guards.check_step(Step(3, 1e-4, 1.5, 1, 8, 0.2, 0.1), cfg, None)
    with pytest.raises(UserError, match="gradient norm became non-finite"):
        guards.check_step(Step(3, 1e-4, 1.5, 1, 8, math.inf, 0.1), cfg, None)
    with pytest.raises(UserError, match="step 3: the updated weights became non-finite"):
        guards.check_step(Step(3, 1e-4, 1.5, 1, 8, 0.2, 0.1, weights_finite=False), cfg, None)


def test_first_ctrl_c_asks_to_stop_second_interrupts():
    before = signal.getsignal(signal.SIGINT)
    with guards.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


# ------------------------------------------------------------------ the issue's divergences
def wikisql_file(tmp_path, rows: int = 40):
    """The issue's data: the first WikiSQL rows as one .jsonl file."""
    from tests.conftest import WIKISQL

    path = tmp_path / f"wikisql{rows}.jsonl"
    lines = (WIKISQL / "train.jsonl").read_text().splitlines()[:rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def issue_run(model, data, out, backend, iters, *extra):
    """The issue's command: SGD at learning rate 1e38 saving every step, all layers."""
    args = [
        "lora",
        "--train",
        "--model",
        model,
        "--data",
        data,
        "--adapter-path",
        out,
        "--backend",
        backend,
        "--iters",
        iters,
        "--batch-size",
        "2",
        "--num-layers",
        "-1",
        "--optimizer",
        "sgd",
        "--learning-rate",
        "1e38",
        "--save-every",
        "1",
        "--val-batches",
        "1",
        *extra,
    ]
    return CliRunner().invoke(main, [str(a) for a in args])


def strict_rows(out) -> list:
    """metrics.jsonl as strict JSON: a bare NaN/Infinity fails the test."""

    def refuse(token):
        pytest.fail(f"bare {token} in metrics.jsonl")

    text = (out / "metrics.jsonl").read_text()
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def backend_class(backend: str):
    if backend == "mlx":
        return MLXBackend
    pytest.importorskip("torch")
    from mlxft.torch_backend import TorchBackend

    return TorchBackend


@pytest.mark.parametrize("iters", ["4", "1"])
@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_an_update_that_breaks_the_weights_is_never_saved(backend, iters, stories, tmp_path):
    """The issue's repro: the first update overflows the weights; the run stops at that step
    with nothing saved or named (it used to save step 1 as the 'last good checkpoint', and with
    --iters 1 exit 0 with a NaN adapter and a bare NaN in metrics.jsonl)."""
    out = tmp_path / "out"
    line = one_error_line(issue_run(stories, wikisql_file(tmp_path), out, backend, iters))
    assert line.startswith("Error: step 1: the updated weights became non-finite"), line
    assert "no checkpoint was saved yet" in line and "learning_rate (now 1e+38)" in line
    assert not (out / "adapter_model.safetensors").exists()
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())
    assert [row["step"] for row in strict_rows(out)] == [0]


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_weights_that_poison_the_next_loss_lose_their_checkpoint(
    backend, stories, tmp_path, monkeypatch
):
    """Weights the fused check cannot fault (simulated: it always passes) still never stay
    saved: step 2's loss is computed with step 1's weights, so its NaN removes checkpoint
    step-1 and the error names no checkpoint as good."""
    cls = backend_class(backend)
    real = cls.train_step
    monkeypatch.setattr(
        cls,
        "train_step",
        lambda self, b, lr, stop=False: real(self, b, lr, stop)._replace(weights_finite=True),
    )
    out = tmp_path / "out"
    result = issue_run(stories, wikisql_file(tmp_path), out, backend, "4")
    line = one_error_line(result)
    assert line.startswith("Error: step 2: the loss and gradient norm became non-finite"), line
    assert "no checkpoint was saved yet" in line
    assert f"Removed checkpoint {out / 'checkpoints' / 'step-0000001'}" in result.output
    assert not list((out / "checkpoints").iterdir())
    assert not (out / "adapter_model.safetensors").exists()
    strict_rows(out)


def test_final_validation_guards_the_adapter(stories, tmp_path, monkeypatch):
    """--iters 1 with weights the fused check passes: the final validation runs on them, and
    its non-finite loss keeps them from becoming the adapter."""
    real = MLXBackend.train_step
    monkeypatch.setattr(
        MLXBackend,
        "train_step",
        lambda self, b, lr, stop=False: real(self, b, lr, stop)._replace(weights_finite=True),
    )
    out = tmp_path / "out"
    line = one_error_line(issue_run(stories, wikisql_file(tmp_path), out, "mlx", "1"))
    assert line.startswith("Error: step 1: the validation loss became non-finite (nan)"), line
    assert not (out / "adapter_model.safetensors").exists()
    rows = strict_rows(out)  # step 1's training loss (of the weights before it) is reported
    assert [row["step"] for row in rows if "val_loss" in row] == [0]


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_a_run_stalled_at_uniform_predictions_warns(backend, stories, tmp_path):
    """AdamW at learning rate 1e6 saturates the adapter within a few steps: the loss sits at
    ln(512) with zero gradients.  The run finishes, but says so.  (On torch the saturated
    backward sometimes overflows to a NaN gradient instead, depending on the matmul library and
    threads: then the guard stops the run; either way it never ends silently.)"""
    out = tmp_path / "out"
    args = [
        "lora",
        "--train",
        "--model",
        stories,
        "--data",
        wikisql_file(tmp_path),
        "--adapter-path",
        out,
        "--backend",
        backend,
        "--iters",
        "4",
        "--batch-size",
        "2",
        "--learning-rate",
        "1e6",
        "--val-batches",
        "1",
    ]
    result = CliRunner().invoke(main, [str(a) for a in args])
    if backend == "torch" and result.exit_code == 2:
        assert "the gradient norm and updated weights became non-finite" in one_error_line(result)
        return
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning: step")]
    assert len(warnings) == 1, result.stderr
    assert f"stuck at ln(vocabulary size) = {math.log(512):.4f} with zero gradients" in warnings[0]


def test_stall_detection_needs_both_signs():
    assert guards.collapsed(math.log(512), 0.0, 512)
    assert guards.collapsed(math.log(512), 0.5, 512) is None  # still learning
    assert guards.collapsed(3.0, 0.0, 512) is None  # e.g. every target masked
    assert guards.collapsed(math.log(512), 0.0, None) is None


def test_metrics_rows_are_strict_json(tmp_path):
    from mlxft.training.metrics import Reporter

    reporter = Reporter(tmp_path / "metrics.jsonl", 10, quiet=True)
    reporter.train(1, math.nan, 1e-4, 1.0, 10.0, 5, 0.1, math.inf)
    reporter.close()
    (row,) = strict_rows(tmp_path)
    assert row["train_loss"] is None and row["grad_norm"] is None and row["step"] == 1


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_train_step_reports_whether_the_updated_state_is_usable(backend, stories, tmp_path):
    """`StepResult.weights_finite`, on each backend: true for a normal step; false once a
    weight is beyond what float32 can square (here planted in lora_B)."""
    from mlxft.data import make_batch
    from mlxft.training.session import Session
    from tests.session_helpers import make_config

    backend_class(backend)
    cfg = make_config(stories, wikisql_file(tmp_path, 8), tmp_path / "o", backend=backend)
    session = Session(cfg, reporter_quiet=True)
    session.backend.setup_training(cfg)
    seqs = session.splits["train"].sequences[:2]
    batch = make_batch(seqs, [np.ones(len(s), bool) for s in seqs], session.pad_id)
    assert session.backend.train_step([batch], 1e-3).weights_finite is True
    weights = session.backend.adapter_weights()
    key = next(k for k in weights if k.endswith("lora_B.weight"))
    weights[key] = np.full_like(weights[key], 1e30)
    session.backend.set_adapter_weights(weights)
    assert session.backend.train_step([batch], 1e-3).weights_finite is False
