"""report_to: every metrics.jsonl row reaches TensorBoard, W&B and MLflow, read back with each
tool's own reader (tensorboard's EventAccumulator, `wandb leet inspect` on the offline run's
.wandb log, MlflowClient on the sqlite store), step for step, also after a resume that rewinds
(an older checkpoint of a finished run, and a SIGKILLed run); plus the progress bar, the
tracker-free import path and a tracker that fails mid-run."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import shutil
import signal
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mlxft.cli import main
from tests.conftest import write_wikisql
from tests.test_resume import SAVE_EVERY, lora_args, start, wait_for_step

ALL = ["--report-to", "tensorboard,wandb", "--report-to", "mlflow"]
# an evaluation row's keys that the training row of its step also has: trackers get them prefixed
SHARED = {
    "learning_rate",
    "tokens_per_second",
    "iterations_per_second",
    "trained_tokens",
    "peak_memory_gb",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """64 training examples: 16 batches of 4, as in test_resume."""
    return write_wikisql(tmp_path_factory.mktemp("trackers_data"), 64, 4)


@pytest.fixture(scope="module")
def empty_mlflow_db(tmp_path_factory):
    """An MLflow sqlite store with its schema: creating one runs MLflow's ~50 schema migrations
    (seconds), so the runs below start from a copy of this one."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def tracker_env(monkeypatch, tmp_path):
    """Offline defaults (no WANDB_MODE / MLFLOW_TRACKING_URI), W&B's home folders in tmp, and no
    WANDB_SERVICE: W&B sets it for child processes once this process ran wandb, and a run
    started by a child would then live in this process's W&B service, past the child's SIGKILL."""
    for name in (
        "WANDB_MODE",
        "WANDB_DIR",
        "MLFLOW_TRACKING_URI",
        "WANDB_API_KEY",
        "WANDB_SERVICE",
    ):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))


@pytest.fixture
def mlflow_db_ready(tmp_path, empty_mlflow_db):
    """tmp_path/run/mlflow/mlflow.db exists already (the schema set-up is tested once, above)."""
    (tmp_path / "run" / "mlflow").mkdir(parents=True)
    shutil.copy(empty_mlflow_db, tmp_path / "run" / "mlflow" / "mlflow.db")


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ------------------------------------------------------------------------ expected and read back
def expected(out: Path) -> dict:
    """{key: [(step, value)]} as the trackers must have it, from metrics.jsonl."""
    series = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        kind = "val" if "val_loss" in row else None
        for key, value in row.items():
            if key != "step":
                name = f"{kind}_{key}" if kind and key in SHARED else key
                series.setdefault(name, []).append((row["step"], value))
    return series


def tensorboard_scalars(out: Path, run_id: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "runs" / run_id))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(run_dir: Path) -> list:
    """The records of one offline run's .wandb transaction log, through wandb's own reader."""
    wandb_cli = Path(sys.executable).parent / "wandb"
    proc = subprocess.run(
        [str(wandb_cli), "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0 and "No such command" in proc.stderr:
        pytest.skip(
            "this wandb has no `wandb leet inspect` (the .wandb log reader); wandb >= 0.31 has"
        )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def wandb_history(out: Path, run_id: str) -> tuple:
    """({key: [(step, value)]}, [branch steps]) of the run `run_id` as W&B will hold it: the
    offline logs in start order, each resumed one rewinding the history to its branch point."""
    logs = []
    for run_dir in (out / "wandb").glob(f"offline-run-*-{run_id}*"):
        records = wandb_records(run_dir)
        run = next((r["run"] for r in records if r["type"] == "run"), None)
        if run is None:  # a log that a SIGKILL stopped before its first write
            continue
        assert run["run_id"] == run_id
        logs.append((run["start_time"], run.get("branch_point"), records))
    rows, branches = {}, []
    for _, branch, records in sorted(logs, key=lambda log: log[0]):
        if branch:
            assert branch["run"] == run_id and branch["metric"] == "_step"
            branches.append(int(branch["value"]))
            rows = {step: row for step, row in rows.items() if step <= int(branch["value"])}
        for record in records:
            if record["type"] == "history":
                item = record["history"]["item"]
                rows[item["_step"]] = {k: v for k, v in item.items() if not k.startswith("_")}
    series = {}
    for step in sorted(rows):
        for key, value in rows[step].items():
            series.setdefault(key, []).append((step, value))
    return series, branches


def mlflow_history(out: Path, run_id: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlflow' / 'mlflow.db').resolve()}")
    keys = client.get_run(run_id).data.metrics
    return {
        k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys
    }


def assert_same(got: dict, want: dict, what: str, float32: bool = False) -> None:
    assert sorted(got) == sorted(want), f"{what}: other keys than metrics.jsonl"
    for key in want:
        steps = [s for s, _ in got[key]]
        assert steps == [s for s, _ in want[key]], f"{what} {key}: steps {steps}"
        values = np.asarray([v for _, v in want[key]], dtype=np.float32 if float32 else np.float64)
        np.testing.assert_array_equal(
            np.asarray([v for _, v in got[key]], dtype=values.dtype),
            values,
            err_msg=f"{what} {key}",
        )


def after(series: dict, step: int) -> dict:
    cut = {key: [(s, v) for s, v in points if s > step] for key, points in series.items()}
    return {key: points for key, points in cut.items() if points}


def assert_trackers_match(out: Path, wandb_from: int = -1) -> dict:
    """Each tracker holds metrics.jsonl's rows; W&B those after `wandb_from` at least (a
    SIGKILL loses what W&B's offline log had not written yet: wandb writes it every second)."""
    ids = json.loads((out / "trackers.json").read_text())
    want = expected(out)
    assert_same(tensorboard_scalars(out, ids["tensorboard"]), want, "TensorBoard", float32=True)
    history, branches = wandb_history(out, ids["wandb"])
    assert_same(after(history, wandb_from), after(want, wandb_from), "W&B")
    for key, points in history.items():  # and what it kept from before equals metrics.jsonl
        assert set(points) <= set(want[key]), f"W&B {key}"
    assert_same(mlflow_history(out, ids["mlflow"]), want, "MLflow")
    return {"ids": ids, "branches": branches}


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_every_row_reaches_each_tracker_and_resume_rewinds_them(
    stories, data, tracker_env, tmp_path
):
    """A finished 12-step run, then --resume-from its step-4 checkpoint: each tracker holds
    the resumed run once (the abandoned steps 5-12 dropped), in the same tracker run."""
    out = tmp_path / "run"
    args = lora_args(
        stories,
        data,
        out,
        "mlx",
        "--iters",
        "12",
        "--keep-checkpoints",
        "10",
        "--steps-per-eval",
        "5",
        "--run-name",
        "demo-run",
        "--project",
        "mlxft-tests",
        *ALL,
    )
    result = cli(*args)
    assert result.exit_code == 0, result.output
    first = assert_trackers_match(out)
    assert first["branches"] == []
    ids = first["ids"]
    assert ids["tensorboard"].startswith("demo-run-")

    # hyperparameters and the adapter as an artifact
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlflow' / 'mlflow.db').resolve()}")
    run = client.get_run(ids["mlflow"])
    assert run.info.run_name == "demo-run" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "mlxft-tests"
    assert run.data.params["lora_parameters.rank"] == "8" and run.data.params["iters"] == "12"
    assert {Path(a.path).name for a in client.list_artifacts(ids["mlflow"], "adapter")} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "mlxft_config.yaml",
    }
    records = [r for d in (out / "wandb").glob("offline-run-*") for r in wandb_records(d)]
    wandb_run = next(r["run"] for r in records if r["type"] == "run")
    assert wandb_run["project"] == "mlxft-tests" and wandb_run["display_name"] == "demo-run"
    assert wandb_run["config"]["update"]["lora_parameters"]["rank"] == 8
    artifact = next(r["artifact"] for r in records if r["type"] == "artifact")
    assert {e["path"] for e in artifact["manifest"]["contents"]} >= {"adapter_model.safetensors"}
    assert next(r["exit"]["exit_code"] for r in records if r["type"] == "exit") == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "runs" / ids["tensorboard"]))
    acc.Reload()
    assert (
        "_hparams_/session_start_info" in acc.Tags()["tensors"]
        and "config" in acc.Tags()["tensors"]
    )

    result = cli(*args, "--resume-from", out / "checkpoints" / f"step-{SAVE_EVERY:07d}")
    assert result.exit_code == 0, result.output
    again = assert_trackers_match(out)
    assert again["ids"] == ids, "the resumed run opened new tracker runs"
    assert again["branches"] == [SAVE_EVERY]
    assert [p.name for p in (out / "runs").iterdir()] == [ids["tensorboard"]]
    assert len(client.search_runs([run.info.experiment_id])) == 1
    state = json.loads((out / "checkpoints" / "step-0000008" / "trainer_state.json").read_text())
    assert state["trackers"] == ids


@pytest.mark.slow
def test_a_sigkilled_run_resumes_its_tracker_runs(
    stories, data, tracker_env, mlflow_db_ready, tmp_path
):
    out = tmp_path / "run"
    args = lora_args(stories, data, out, "mlx", *ALL)
    proc = start(args)
    # step SAVE_EVERY + 1 went to every tracker: a row the resume must drop (a bounded poll; the
    # trackers' start-up takes seconds on a busy runner)
    wait_for_step(proc, out, SAVE_EVERY + 1, timeout=600)
    proc.kill()
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    ids = json.loads((out / "trackers.json").read_text())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlflow' / 'mlflow.db').resolve()}")
    assert max(m.step for m in client.get_metric_history(ids["mlflow"], "train_loss")) > SAVE_EVERY
    assert (
        max(s for s, _ in tensorboard_scalars(out, ids["tensorboard"])["train_loss"]) > SAVE_EVERY
    )
    result = cli(*args, "--resume")
    assert result.exit_code == 0, result.output
    again = assert_trackers_match(out, wandb_from=SAVE_EVERY)
    assert again["ids"] == ids and again["branches"] == [SAVE_EVERY]
    assert max(s for s, _ in tensorboard_scalars(out, ids["tensorboard"])["train_loss"]) == 20


# ----------------------------------------------------------------------------- in-process, fast
class Fake:
    def __init__(self, name, fail=None):
        self.name, self.fail, self.rows, self.finished = name, fail, [], "open"

    def log(self, row, step):
        if self.fail == "log" and len(self.rows) == 1:
            raise ConnectionError("server went away")
        self.rows.append((step, row))

    def finish(self, adapter_dir):
        self.finished = adapter_dir


def test_reporter_fans_rows_out_and_drops_a_failing_tracker(tmp_path, capsys):
    from mlxft.training.metrics import Reporter

    good, bad = Fake("good"), Fake("bad", fail="log")
    reporter = Reporter(tmp_path / "metrics.jsonl", 10, quiet=True, trackers=[good, bad])
    reporter.evaluation(0, "val", 2.0, 10, 0.1, 1e-3, 0.0, 0.0, 0, 0.5)
    reporter.train(1, 1.5, 1e-3, 2.0, 100.0, 40, 0.5, 0.7)
    reporter.train(2, 1.4, 1e-3, 2.0, 100.0, 80, 0.5, 0.7)
    reporter.close(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in good.rows] == [0, 1, 2] and len(rows) == 3
    assert good.rows[0][1]["val_loss"] == 2.0 and good.rows[0][1]["val_learning_rate"] == 1e-3
    assert "learning_rate" not in good.rows[0][1] and good.rows[1][1]["learning_rate"] == 1e-3
    assert good.rows[1][1] == {k: v for k, v in rows[1].items() if k != "step"}
    assert good.finished == tmp_path and bad.finished == "open" and len(bad.rows) == 1
    err = capsys.readouterr().err
    assert (
        "Warning: bad: log failed (ConnectionError: server went away)" in err
        and len(err.splitlines()) == 1
    )


def test_report_to_values(tmp_path):
    from mlxft.config import build_config

    assert build_config(overrides={"report_to": "WandB, tensorboard"}).report_to == [
        "wandb",
        "tensorboard",
    ]
    assert build_config(overrides={"report_to": ["mlflow", "mlflow,wandb"]}).report_to == [
        "mlflow",
        "wandb",
    ]
    assert build_config(overrides={"report_to": "none"}).report_to == []
    assert build_config(overrides={}).report_to == []
    config = tmp_path / "c.yaml"
    config.write_text("report_to: [tensorboard]\nrun_name: x\nproject: p\n")
    cfg = build_config(str(config), {"report_to": None})
    assert (cfg.report_to, cfg.run_name, cfg.project) == (["tensorboard"], "x", "p")
    assert (
        build_config(str(config), {"report_to": ["none"]}).report_to == []
    )  # the flag beats the file


def test_missing_tracker_is_found_before_the_run(monkeypatch, tmp_path):
    from mlxft.config import build_config
    from mlxft.errors import UserError

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(
        UserError,
        match=r"--report-to: report_to 'mlflow' needs mlflow, which is not installed: "
        r"pip install 'mlxft\[mlflow\]'",
    ):
        build_config(overrides={"report_to": ["mlflow"], "train": True})
    assert build_config(overrides={"report_to": ["mlflow"]}).report_to == [
        "mlflow"
    ]  # --test only: not needed


# ------------------------------------------------------------------------ progress bar, imports
SCRIPT = """
import sys
from mlxft.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    assert not exit.code, exit.code
print("tracker modules:", sorted(m for m in ("tensorboard", "wandb", "mlflow") if m in sys.modules))
"""


def on_a_terminal(args) -> str:
    """The command's output (stdout and stderr) on a pseudo-terminal."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # rows, columns
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, *[str(a) for a in args]],
        stdout=follower,
        stderr=follower,
        env=env,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=300) == 0, b"".join(chunks)[-2000:]
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_progress_bar_on_a_terminal_and_no_tracker_imports(stories, data, tmp_path):
    text = on_a_terminal(
        lora_args(stories, data, tmp_path / "run", "mlx", "--iters", "6", "--steps-per-report", "3")
    )
    bars = [part for part in text.split("\r") if part.startswith("Training:")]
    assert bars, text[-2000:]
    last = bars[-1]
    assert "/6 [" in last and ("step/s" in last or "s/step" in last), last
    assert "<" in last.split("[")[1], f"no ETA in {last!r}"
    assert "loss " in last and "tok/s " in last, last
    assert "Iter 6: train loss" in text  # the report lines survive the bar
    assert "tracker modules: []" in text


def test_conversion_bar_computes_tensor_by_tensor(monkeypatch, capsys):
    """convert and fuse compute their (lazy) tensors in `numpy_weights`: on a terminal one by
    one under a bar by bytes, else at once and silently; the same values either way."""
    import mlx.core as mx

    from mlxft import progress
    from mlxft.mlx_backend.arrays import numpy_weights

    def weights():
        return {"a": mx.zeros((256, 256)) + 1, "b": mx.arange(64).astype(mx.bfloat16)}

    monkeypatch.setattr(progress, "on_terminal", lambda quiet=False: True)
    shown = numpy_weights(weights(), "Converting")
    err = capsys.readouterr().err
    assert "Converting" in err and "262k" in err.replace("kB", "k"), err
    monkeypatch.setattr(progress, "on_terminal", lambda quiet=False: False)
    silent = numpy_weights(weights(), "Converting")
    assert capsys.readouterr().err == ""
    assert shown["a"].sum() == 256 * 256 and np.array_equal(shown["b"].bits, silent["b"].bits)


def test_no_files_without_report_to(stories, data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "trackers.json").write_text("{}")  # an earlier run's: a fresh run moves it aside
    result = cli(*lora_args(stories, data, out, "mlx", "--iters", "2"))
    assert result.exit_code == 0, result.output
    assert not {"trackers.json", "runs", "wandb", "mlflow"} & {p.name for p in out.iterdir()}
    assert "\r" not in result.output and "Training:" not in result.output  # no terminal: no bar
