"""Experiment trackers: every metrics.jsonl row also goes to TensorBoard, W&B or MLflow.

`report_to: [tensorboard, wandb, mlflow]` picks them.  Each is one class behind `Tracker`;
the Reporter (`mlxft.training.metrics`) hands every row it writes to metrics.jsonl to each
tracker, with the same keys and step.  A tracker's library is imported when its run starts, so
a run without `report_to` never imports one.  Each writes under adapter_path unless the tool's
own variable says otherwise (read in `mlxft.flags`), and nothing needs a network by default:

    tensorboard  runs/<run_name>-<time>/events.out.tfevents.*   (tensorboard --logdir …/runs)
    wandb        wandb/offline-run-*: offline unless WANDB_MODE is set; `wandb sync` uploads it
                 (WANDB_DIR moves it)
    mlflow       sqlite:///adapter_path/mlflow/mlflow.db + mlflow/artifacts (MLFLOW_TRACKING_URI
                 sends it to a server or another store instead)

A resumed run continues the same tracker runs (their ids are in adapter_path/trackers.json
and in every checkpoint's trainer_state.json) and, as `checkpoint.rewind` does to
metrics.jsonl, drops what the abandoned continuation logged after the checkpoint: TensorBoard
event files are rewritten without those steps (plus TensorBoard's own SessionLog.START restart
marker), W&B rewinds the run (`resume_from=<id>?_step=N`), MLflow's points are deleted from our
sqlite store (an MLflow server has no way to delete them: a note says so).  Only rank 0 of a
data-parallel run tracks: it owns adapter_path, and one run is one tracker run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Protocol

from mlxft import flags
from mlxft.errors import UserError
from mlxft.fileio import atomic_file, write_json

NAMES = ("tensorboard", "wandb", "mlflow")
IDS_FILE = "trackers.json"
# Uploaded as the run's artifact at the end (not a full fine-tune's model: it is the model's size).
ARTIFACT_FILES = ("adapter_config.json", "adapter_model.safetensors", "mlxft_config.yaml")
# Keys an evaluation row shares with the training row of the same step: a tracker gets them
# with the row's prefix (`val_tokens_per_second`), so the two rows never write one series twice.
SHARED = (
    "learning_rate",
    "tokens_per_second",
    "iterations_per_second",
    "trained_tokens",
    "peak_memory_gb",
)


class Tracker(Protocol):
    name: str
    notes: list  # one-line notices for the console (where the run is, how to upload it)

    def start(self, config: dict, resume_id: str | None, resume_step: int) -> str:
        """Open the run (or continue `resume_id`, dropping points after `resume_step`); its id."""

    def log(self, row: dict, step: int) -> None:
        """One metrics row (`tracker_row`) at `step`."""

    def finish(self, adapter_dir: Path | None) -> None:
        """Close the run: finished with `adapter_dir` as its artifact, or stopped early (None)."""


def tracker_row(record: dict) -> dict:
    """A metrics.jsonl row as the trackers get it: the same keys and numbers, without `step`
    (their step axis) and without what is not a number (`samples`: eval_prompts' generations
    stay in metrics.jsonl), and an evaluation row's SHARED keys prefixed by its kind."""
    kind = next(
        (k[: -len("_loss")] for k in record if k.endswith("_loss") and k != "train_loss"), None
    )
    return {
        (f"{kind}_{k}" if kind and k in SHARED else k): v
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


# --------------------------------------------------------------------------- set-up
def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None
        return False


def missing(name: str) -> str | None:
    """None when tracker `name` can run here, else what to install (checked without importing)."""
    modules = {"tensorboard": ("tensorboard",), "wandb": ("wandb",), "mlflow": ("mlflow",)}[name]
    if name == "mlflow" and _own_mlflow_store():  # the sqlite store needs MLflow's database layer
        modules += ("sqlalchemy", "alembic")
    absent = [m for m in modules if not _installed(m)]
    if absent:
        needs = ", ".join(absent)
        return (
            f"report_to '{name}' needs {needs}, which is not installed: pip install 'mlxft[{name}]'"
        )
    return None


def hyperparameters(cfg) -> dict:
    """The resolved config, as mlxft_config.yaml has it."""
    return dataclasses.asdict(dataclasses.replace(cfg, resume=False, resume_from=None))


def flat(config: dict, prefix: str = "") -> dict:
    """{"lora_parameters.rank": 8, ...}: scalars as they are, anything else as JSON text."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = (
                value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
            )
    return out


def artifact_files(adapter_dir: Path) -> list:
    return [Path(adapter_dir) / n for n in ARTIFACT_FILES if (Path(adapter_dir) / n).is_file()]


def open_trackers(cfg, adapter_dir: Path, saved_ids: dict, resume_step: int) -> tuple:
    """(trackers, {name: run id}, notes) for `cfg.report_to`, each run started; the ids are
    written to adapter_path/trackers.json.  `saved_ids` (from the checkpoint) continue those
    runs.  Rank 0 alone calls it in a data-parallel run: it owns adapter_path, and a run is one
    tracker run, not one per rank.  Call it with the run directory prepared (an earlier run's
    trackers.json moved aside by `mlxft.training.run_dir`)."""
    adapter_dir = Path(adapter_dir)
    if not cfg.report_to:
        return [], {}, []
    run_name = cfg.run_name or adapter_dir.resolve().name
    config = hyperparameters(cfg)
    trackers, ids, notes = [], {}, []
    for name in cfg.report_to:
        tracker = CLASSES[name](adapter_dir, run_name, cfg.project or "mlxft")
        try:
            ids[name] = tracker.start(config, saved_ids.get(name), resume_step)
        except Exception as err:  # each library has its own errors; all mean no run
            for started in trackers:
                started.finish(None)
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            raise UserError(f"report_to: {name} could not start a run ({reason})") from None
        trackers.append(tracker)
        notes += tracker.notes
    write_json(adapter_dir / IDS_FILE, ids)
    return trackers, ids, notes


# --------------------------------------------------------------------------- TensorBoard
class TensorBoard:
    """Event files written with tensorboard's own writer and protos (no TensorFlow needed)."""

    name = "tensorboard"

    def __init__(self, adapter_dir: Path, run_name: str, project: str):
        self.root, self.run_name, self.notes = adapter_dir / "runs", run_name, []

    def start(self, config: dict, resume_id: str | None, resume_step: int) -> str:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        run_id = resume_id or f"{self.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        logdir = self.root / run_id
        if resume_id:
            rewind_events(logdir, resume_step)
        self._writer = EventFileWriter(str(logdir))
        # TensorBoard's restart marker: readers drop earlier events from this step on
        self._writer.add_event(
            Event(
                wall_time=time.time(),
                step=resume_step + 1 if resume_id else 0,
                session_log=SessionLog(status=SessionLog.START),
            )
        )
        if not resume_id:
            import yaml
            from tensorboard.plugins.hparams.summary_v2 import hparams_pb
            from tensorboard.plugins.text.summary_v2 import text_pb

            self._writer.add_event(
                Event(wall_time=time.time(), step=0, summary=hparams_pb(flat(config)))
            )
            text = "```\n" + yaml.safe_dump(config, sort_keys=False) + "```"
            self._writer.add_event(
                Event(wall_time=time.time(), step=0, summary=text_pb("config", text))
            )
        self._writer.flush()
        self.notes.append(f"TensorBoard: {logdir} (tensorboard --logdir {self.root})")
        return run_id

    def log(self, row: dict, step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=key, simple_value=float(value)) for key, value in row.items()]
        self._writer.add_event(
            Event(wall_time=time.time(), step=step, summary=Summary(value=values))
        )
        self._writer.flush()  # a live TensorBoard (and a kill) sees every row

    def finish(self, adapter_dir: Path | None) -> None:
        self._writer.close()


def rewind_events(logdir: Path, step: int) -> None:
    """Rewrite the run's event files without the events after `step` (atomically, file by
    file), so every reader sees the resumed run once, not only TensorBoard's own purge."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        records = list(RawEventFileLoader(str(path)).Load())  # stops at a record cut by a kill
        kept = [r for r in records if Event.FromString(r).step <= step]
        # a record cut by a kill leaves bytes the loader skipped (16: a record's length and CRCs)
        cut_tail = path.stat().st_size > sum(len(r) + 16 for r in records)
        if len(kept) < len(records) or cut_tail:
            with atomic_file(path) as handle:
                writer = RecordWriter(handle)
                for record in kept:
                    writer.write(record)


# --------------------------------------------------------------------------- Weights & Biases
class WandB:
    """wandb.init/log/finish; offline (a local run directory) unless WANDB_MODE says otherwise."""

    name = "wandb"

    def __init__(self, adapter_dir: Path, run_name: str, project: str):
        self.adapter_dir, self.run_name, self.project = adapter_dir, run_name, project
        self.notes = []

    def start(self, config: dict, resume_id: str | None, resume_step: int) -> str:
        import wandb

        # our console stays ours (no capture, no banner): our notes say where the run is
        settings = {"console": "off", "silent": True}
        if "x_transaction_log_flush_interval" in getattr(wandb.Settings, "model_fields", {}):
            # the offline log is written every 15 s by default: a killed run would lose that much
            settings["x_transaction_log_flush_interval"] = 1.0
        kwargs = dict(
            project=self.project,
            name=self.run_name,
            config=config,
            dir=None if flags.wandb_dir() else str(self.adapter_dir),
            mode=None if flags.wandb_mode() else "offline",
            settings=wandb.Settings(**settings),
        )
        if resume_id:  # W&B's rewind: the run keeps its history up to resume_step and continues
            kwargs["resume_from"] = f"{resume_id}?_step={resume_step}"
        try:
            self.run = wandb.init(**kwargs)
        except wandb.Error as err:
            if not resume_id:
                raise
            # a server without rewind: continue the run; W&B ignores steps it already has
            kwargs.pop("resume_from")
            self.run = wandb.init(id=resume_id, resume="allow", **kwargs)
            self.notes.append(
                f"W&B: no rewind on this server ({str(err).splitlines()[0]}); the points the "
                f"earlier process logged after step {resume_step} stay in run {resume_id}"
            )
        if self.run.offline:
            where = Path(self.run.dir).parent  # run.dir is the run's files/ folder
            self.notes.append(
                f"W&B: offline run {self.run.id} in {where} (upload it: wandb sync {where})"
            )
        return self.run.id

    def log(self, row: dict, step: int) -> None:
        self.run.log(row, step=step)

    def finish(self, adapter_dir: Path | None) -> None:
        import wandb

        files = artifact_files(adapter_dir) if adapter_dir is not None else []
        if files:
            artifact = wandb.Artifact(f"{self.run.id}-adapter", type="model")
            for path in files:
                artifact.add_file(str(path))
            self.run.log_artifact(artifact)
        self.run.finish(exit_code=0 if adapter_dir is not None else 1)


# --------------------------------------------------------------------------- MLflow
def _own_mlflow_store() -> bool:
    return flags.mlflow_tracking_uri() is None


class MLflow:
    """MlflowClient on a sqlite store in adapter_path (or MLFLOW_TRACKING_URI's)."""

    name = "mlflow"

    def __init__(self, adapter_dir: Path, run_name: str, project: str):
        self.run_name, self.project, self.notes = run_name, project, []
        self.own = _own_mlflow_store()
        self.home = (adapter_dir / "mlflow").resolve()
        self.uri = flags.mlflow_tracking_uri() or f"sqlite:///{self.home / 'mlflow.db'}"

    def start(self, config: dict, resume_id: str | None, resume_step: int) -> str:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        for logger in ("alembic", "mlflow.store.db.utils"):  # schema set-up chatter on stderr
            logging.getLogger(logger).setLevel(logging.WARNING)
        if self.own:
            self.home.mkdir(parents=True, exist_ok=True)
        self.client = client = MlflowClient(tracking_uri=self.uri)
        experiment = client.get_experiment_by_name(self.project)
        experiment_id = (
            experiment.experiment_id
            if experiment
            else client.create_experiment(
                self.project,
                artifact_location=(self.home / "artifacts").as_uri() if self.own else None,
            )
        )
        run, known = None, {}
        if resume_id:
            try:
                run = client.get_run(resume_id)
            except MlflowException:
                self.notes.append(
                    f"MLflow: run {resume_id} is not in {self.uri}; starting a new run"
                )
        if run is not None:
            self.run_id, known = resume_id, run.data.params
            client.update_run(resume_id, status="RUNNING")
            self._rewind(resume_step)
        else:
            self.run_id = client.create_run(experiment_id, run_name=self.run_name).info.run_id
        params = [
            Param(k, str(v)[:6000]) for k, v in flat(config).items() if k not in known
        ]  # params are write-once
        for i in range(0, len(params), 100):  # MLflow's batch limit
            client.log_batch(self.run_id, params=params[i : i + 100])
        self.notes.append(f"MLflow: run {self.run_id} in experiment '{self.project}' at {self.uri}")
        return self.run_id

    def _rewind(self, step: int) -> None:
        """Delete the points after `step` (in our own sqlite store; a server cannot)."""
        if not self.own:
            self.notes.append(
                f"MLflow: {self.uri} keeps the points the earlier process logged after step {step} "
                "(MLflow has no way to delete them); metrics.jsonl does not have them"
            )
            return
        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = SqlAlchemyStore(self.uri, (self.home / "artifacts").as_uri())
        with store.ManagedSessionMaker() as session:
            for table in (SqlMetric, SqlLatestMetric):
                session.query(table).filter(
                    table.run_uuid == self.run_id, table.step > step
                ).delete()

    def log(self, row: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in row.items()]
        )

    def finish(self, adapter_dir: Path | None) -> None:
        for path in artifact_files(adapter_dir) if adapter_dir is not None else []:
            self.client.log_artifact(self.run_id, str(path), artifact_path="adapter")
        self.client.set_terminated(self.run_id, "FINISHED" if adapter_dir is not None else "KILLED")


CLASSES = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}
