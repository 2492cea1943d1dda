"""The run directory (adapter_path) is never lost or mixed: every check runs before it is
touched, an earlier run is moved aside rather than deleted, one run at a time holds it (a
killed holder's lock is taken over), temporaries a kill left are swept, and `generate` only
quantizes the base when the adapter's own weights file says it was trained that way."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxft.cli import main
from mlxft.errors import UserError
from mlxft.mlx_backend import MLXBackend
from mlxft.training import run_dir
from tests.conftest import STORIES, write_wikisql

HOLD = (
    "import sys\n"
    "from mlxft.training.run_dir import RunLock\n"
    "with RunLock(sys.argv[1]):\n"
    "    print('locked', flush=True)\n"
    "    sys.stdin.readline()\n"
)


def lora(model, data, out, *extra):
    args = [
        "lora",
        "--train",
        "--model",
        model,
        "--data",
        data,
        "--adapter-path",
        out,
        "--batch-size",
        "2",
        "--val-batches",
        "1",
        "--max-seq-length",
        "64",
        *extra,
    ]
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_wikisql(tmp_path_factory.mktemp("run_dir_data"), 12, 4)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):
    """A finished 5-step run with checkpoints at steps 2 and 4; tests copy it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = lora(STORIES, data, out, "--iters", "5", "--save-every", "2")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def run(finished, tmp_path):
    return Path(shutil.copytree(finished, tmp_path / "run"))


def failing_setup(self, cfg):
    raise UserError("setup failed on purpose")


# ---------------------------------------------------------------------------- late failures
@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_a_late_failure_leaves_the_earlier_run_untouched(backend, stories, data, run, monkeypatch):
    """A failure after the model loaded (here: in the backend's training set-up) used to come
    after adapter_path was cleared: checkpoints gone, metrics.jsonl empty."""
    if backend == "torch":
        pytest.importorskip("torch")
        from mlxft.torch_backend import TorchBackend as cls
    else:
        cls = MLXBackend
    monkeypatch.setattr(cls, "setup_training", failing_setup)
    before = snapshot(run)
    line = one_error_line(lora(stories, data, run, "--iters", "3", "--backend", backend))
    assert line == "Error: setup failed on purpose"
    assert snapshot(run) == before


@pytest.mark.parametrize(
    "extra",
    [
        ["--grad-checkpoint", "--dropout", "0.1"],
        ["--config", "optimizer_config: {adamw: {betas: [0.9]}}"],
    ],
    ids=["grad-checkpoint-with-dropout", "bad-optimizer-config"],
)
def test_the_issues_config_errors_leave_the_earlier_run_untouched(
    extra, stories, data, run, tmp_path
):
    if extra[0] == "--config":
        config = tmp_path / "c.yaml"
        config.write_text(extra[1] + "\n")
        extra = ["--config", config]
    before = snapshot(run)
    one_error_line(lora(stories, data, run, "--iters", "3", *extra))
    assert snapshot(run) == before


def test_a_damaged_checkpoint_fails_before_the_run_is_rewound(stories, data, run):
    """--resume-from step 2 would drop checkpoint step-4 and the metrics after step 2: with
    step 2's state damaged, nothing may have been dropped yet."""
    state = run / "checkpoints" / "step-0000002" / "trainer_state.safetensors"
    state.write_bytes(state.read_bytes()[:64])
    before = snapshot(run)
    line = one_error_line(
        lora(stories, data, run, "--iters", "5", "--save-every", "2", "--resume-from", state.parent)
    )
    assert "checkpoint state file" in line and "resume from an earlier checkpoint" in line
    assert snapshot(run) == before


# ---------------------------------------------------------------------------- earlier runs
def test_a_fresh_run_moves_the_earlier_run_aside(stories, data, run):
    before = snapshot(run)
    result = lora(stories, data, run, "--iters", "2")
    assert result.exit_code == 0, result.output
    (previous,) = (run / "previous-runs").iterdir()
    assert f"moved the earlier run in {run}" in result.output and str(previous) in result.output
    assert snapshot(previous) == before  # every file of the earlier run, byte for byte
    assert not (run / "checkpoints").exists()  # this run saved none
    assert (run / "adapter_model.safetensors").read_bytes() != (
        previous / "adapter_model.safetensors"
    ).read_bytes()
    # --resume cannot pick up the earlier run's checkpoints any more
    line = one_error_line(lora(stories, data, run, "--iters", "5", "--resume"))
    assert "--resume: no checkpoint in" in line


def test_generate_quantizes_only_for_an_adapter_trained_quantized(stories, run, tmp_path):
    """The mixed folder the issue found (a new QLoRA config beside an old plain adapter) no
    longer makes `generate` quantize: the adapter's weights file itself must say so."""
    from mlxft.adapters.files import trained_quantization

    config = run / "mlxft_config.yaml"
    config.write_text(config.read_text().replace("quantize: null", "quantize: 4"))
    assert trained_quantization(run) == {}
    args = ["generate", "--model", stories, "--adapter-path", run, "--prompt", "Lily", "-m", "2"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "quantized" not in result.stderr


# ---------------------------------------------------------------------------- the lock
@pytest.fixture
def holder(run):
    """Another process holding adapter_path's lock (a real second process, so a real pid)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=60)


def test_a_second_run_into_a_locked_folder_is_refused(stories, data, run, holder):
    before = snapshot(run)
    for extra in ([], ["--resume"]):
        line = one_error_line(lora(stories, data, run, "--iters", "6", *extra))
        assert line == (
            f"Error: adapter_path: {run} is in use by another mlxft run (pid {holder.pid}); "
            "wait for it to finish, stop it, or choose another --adapter-path"
        )
    assert snapshot(run) == before
    holder.communicate("\n", timeout=60)  # the holder finishes: its lock file goes with it
    assert holder.returncode == 0 and not (run / run_dir.LOCK_FILE).exists()


def test_a_killed_holders_lock_is_taken_over(stories, data, run, holder):
    holder.kill()
    holder.communicate(timeout=60)
    assert (run / run_dir.LOCK_FILE).read_text().strip() == str(holder.pid)
    result = lora(stories, data, run, "--iters", "6", "--save-every", "2", "--resume")
    assert result.exit_code == 0, result.output
    assert f"took over the lock of an earlier run in {run} (pid {holder.pid})" in result.output
    assert not (run / run_dir.LOCK_FILE).exists()


# ---------------------------------------------------------------------------- leftovers
def test_temporaries_a_kill_left_are_swept_at_the_next_start(stories, data, run):
    planted = [
        run / ".adapter_model.safetensors.tmp-ab12cd34",
        run / ".metrics.jsonl.tmp-0x9y8z7w",
        run / "checkpoints" / ".step-0000006.tmp-zz99yy88" / "adapter_model.safetensors",
        run / "checkpoints" / ".step-0000004.old-q1w2e3r4" / "step-0000004" / "x.json",
        run / ".model-staging" / "config.json",
    ]
    for path in planted:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("left by a killed run")
    theirs = [run / ".keepme", run / "notes.tmp-1"]
    for path in theirs:
        path.write_text("not ours")
    result = lora(stories, data, run, "--iters", "6", "--save-every", "2", "--resume")
    assert result.exit_code == 0, result.output
    assert f"removed 5 temporary file(s) an interrupted run left in {run}" in result.output
    assert not any(p.exists() for p in planted[:2])
    assert not any(p.parent.exists() for p in planted[2:])
    assert all(p.read_text() == "not ours" for p in theirs)


def test_a_full_fine_tune_moves_its_model_files_too(tiny_llama, data, tmp_path):
    """A full fine-tune's adapter_path is a model directory: a fresh run moves those files
    aside with the rest, except when it trains the very model in adapter_path."""
    out = tmp_path / "full"
    full = ["--fine-tune-type", "full", "--num-layers", "-1", "--iters", "1"]
    assert lora(tiny_llama, data, out, *full).exit_code == 0
    model = (out / "model.safetensors").read_bytes()
    result = lora(tiny_llama, data, out, *full, "--learning-rate", "1e-3")
    assert result.exit_code == 0, result.output
    (previous,) = (out / "previous-runs").iterdir()
    assert (previous / "model.safetensors").read_bytes() == model
    assert {"config.json", "tokenizer.json", "mlxft_config.yaml"} <= {
        p.name for p in previous.iterdir()
    }
    result = lora(out, data, out, *full)  # go on training the model in adapter_path
    assert result.exit_code == 0, result.output
    (newest,) = sorted((out / "previous-runs").iterdir())[1:]
    assert not (newest / "model.safetensors").exists() and (out / "config.json").is_file()
