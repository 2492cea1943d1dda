"""Checkpoints that let a killed run continue exactly where it stopped.

    <adapter_path>/checkpoints/step-0000100/
        adapter_config.json, adapter_model.safetensors   the weights: a usable adapter directory
        mlxft_config.yaml                                 the run's config
        trainer_state.safetensors                         optimizer tensors `optim.*`, RNG arrays
        `rng.*`
        trainer_state.json                                position + what the run must match

Batches are a pure function of (seed, epoch) and the learning rate of the step, so position
(epoch, index in the epoch) + optimizer state + RNG state is all a resumed run needs to
produce the same losses as an uninterrupted one.  A checkpoint directory appears whole or not
at all (`fileio.atomic_dir`); names are ours (`step-%07d`), never taken from input.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import asdict, dataclass, replace
from dataclasses import fields as fields_of
from pathlib import Path

import numpy as np

from mlxft.config import CONFIG_FILE, save_config
from mlxft.errors import UserError
from mlxft.fileio import atomic_dir, save_safetensors, write_json, write_text
from mlxft.training.metrics import METRICS_FILE

FORMAT = 1
CHECKPOINTS = "checkpoints"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
_NAME = re.compile(r"^step-(\d{7,})$")

# Settings a checkpoint's optimizer state, weights and data position only make sense with.
IDENTITY = (
    "fine_tune_type",
    "quantize",
    "q_group_size",
    "dtype",
    "batch_size",
    "grad_accumulation_steps",
    "max_seq_length",
    "mask_prompt",
    "seed",
    "optimizer",
    "optimizer_config",
    "num_layers",
)
LORA_IDENTITY = ("rank", "scale", "dropout", "keys")
# Settings that may change on resume (the run then differs from an uninterrupted one: we say so).
SCHEDULE = (
    "iters",
    "epochs",
    "learning_rate",
    "lr_schedule",
    "weight_decay",
    "grad_clip",
    "early_stopping_patience",
    "early_stopping_min_delta",
)
# Preference tuning (train_mode dpo/orpo) adds these; SFT fingerprints stay as they were.
PREFERENCE_IDENTITY = ("train_mode", "max_prompt_length")
PREFERENCE_SCHEDULE = ("beta", "label_smoothing", "rpo_alpha")


@dataclass
class Position:
    """Where training stands: enough to resume exactly (with optimizer state and RNG)."""

    step: int = 0
    epoch: int = 0
    index: int = 0  # next batch within the epoch
    trained_tokens: int = 0


def checkpoint_dirs(adapter_path: Path) -> list:
    """[(step, dir)] of complete checkpoints, oldest first."""
    root = Path(adapter_path) / CHECKPOINTS
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = _NAME.match(path.name)
            if match and (path / STATE_JSON).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def find_checkpoint(cfg) -> Path | None:
    """The checkpoint `--resume` / `--resume-from` asks for, checked before any model loads."""
    if cfg.resume_from:
        path = Path(cfg.resume_from)
        if not path.is_dir():
            raise UserError(
                f"resume_from: {path} is not a directory; pass a checkpoint such as "
                f"{Path(cfg.adapter_path) / CHECKPOINTS / 'step-0000100'}"
            )
        if (path / STATE_JSON).is_file():
            return path
        latest = checkpoint_dirs(path)
        if latest:  # an adapter directory: its newest checkpoint
            return latest[-1][1]
        raise UserError(
            f"resume_from: {path} is not an mlxft checkpoint (no {STATE_JSON}); checkpoints are "
            f"the {CHECKPOINTS}/step-NNNNNNN directories written every save_every steps"
        )
    if cfg.resume:
        latest = checkpoint_dirs(Path(cfg.adapter_path))
        if not latest:
            raise UserError(
                f"--resume: no checkpoint in {Path(cfg.adapter_path) / CHECKPOINTS}; checkpoints "
                f"are "
                "written every save_every steps; run without --resume to start over"
            )
        return latest[-1][1]
    return None


# --------------------------------------------------------------------------- fingerprint
def _digest(*chunks) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk if isinstance(chunk, bytes) else str(chunk).encode())
    return h.hexdigest()[:16]


def model_digest(model_path: Path) -> str:
    """config.json + weight file names and sizes: cheap, and changes with any other model."""
    model_path = Path(model_path)
    files = sorted((p.name, p.stat().st_size) for p in model_path.glob("*.safetensors"))
    return _digest((model_path / "config.json").read_bytes(), files)


def data_digest(split) -> str:
    """The tokenized training examples and their target masks: what the batches are built from."""
    h = hashlib.sha256()
    for ids, mask in zip(split.sequences, split.masks):
        h.update(np.asarray(ids, dtype=np.int32).tobytes())
        h.update(np.packbits(np.asarray(mask, dtype=bool)).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def fingerprint(cfg, model_path: Path, train_split) -> dict:
    out = {key: getattr(cfg, key) for key in IDENTITY + SCHEDULE}
    if cfg.train_mode != "sft":
        keys = PREFERENCE_IDENTITY + PREFERENCE_SCHEDULE
        out.update({key: getattr(cfg, key) for key in keys})
    if cfg.fine_tune_type != "full":
        out.update({f"lora_parameters.{k}": cfg.lora_parameters.get(k) for k in LORA_IDENTITY})
    out["model"] = model_digest(model_path)
    out["data"] = data_digest(train_split)
    return json.loads(json.dumps(out))  # as JSON will read it back


def _describe(key: str, saved, now) -> str:
    if key == "model":
        return "the model differs (config.json or weight files)"
    if key == "data":
        return "the training data differs (tokenized train split)"
    return f"{key} is {now!r}, the checkpoint has {saved!r}"


def check_compatible(checkpoint: Path, saved: dict, now: dict) -> list:
    """Refuse a resume that cannot continue the same run; return notices for schedule changes."""
    # a dpo checkpoint resumed as sft has keys `now` lacks
    keys = list(now) + [k for k in PREFERENCE_IDENTITY if k in saved and k not in now]
    changeable = SCHEDULE + PREFERENCE_SCHEDULE
    problems = [
        _describe(k, saved.get(k), now.get(k))
        for k in keys
        if k not in changeable and saved.get(k) != now.get(k)
    ]
    if problems:
        raise UserError(
            f"cannot resume from {checkpoint}: {'; '.join(problems[:3])}. Resume with the "
            f"checkpoint's settings "
            f"({checkpoint / CONFIG_FILE}), or start a new run from its weights with "
            f"--resume-adapter-file {checkpoint}"
        )
    return [
        f"resuming with {_describe(k, saved.get(k), now.get(k))}: the run will differ from an "
        f"uninterrupted one"
        for k in changeable
        if k in now and saved.get(k) != now.get(k)
    ]


# --------------------------------------------------------------------------- RNG
# Optimizer state in checkpoints: torch's slot names under each trainable parameter's PEFT key
# (`K.exp_avg`, `K.exp_avg_sq`, `K.momentum_buffer`) plus `step`, whichever backend wrote it.
OPTIMIZER_SLOTS = {
    "adamw": ("exp_avg", "exp_avg_sq"),
    "adam": ("exp_avg", "exp_avg_sq"),
    "sgd": ("momentum_buffer",),
}


def optimizer_steps(state: dict) -> int:
    if "step" not in state:
        raise UserError("optimizer state has no 'step'; it was not written by mlxft")
    return int(np.asarray(state["step"]).reshape(-1)[0])


def optimizer_slot(state: dict, key: str, shape: tuple, required: bool, kind: str):
    """The saved value for `key` checked against the parameter's shape; None when absent and
    not `required` (a run saved before its first step, or SGD without momentum)."""
    value = state.get(key)
    if value is None:
        if required:
            raise UserError(
                f"optimizer state has no '{key}': it was saved for another adapter or optimizer "
                f"({kind} now)"
            )
        return None
    if tuple(value.shape) != tuple(shape):
        raise UserError(
            f"optimizer state '{key}' has shape {tuple(value.shape)}, expected {tuple(shape)}"
        )
    return np.asarray(value)


def numpy_rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "numpy.keys": np.asarray(keys, dtype=np.uint32),
        "numpy.pos": np.array([pos], dtype=np.int64),
        "numpy.has_gauss": np.array([has_gauss], dtype=np.int64),
        "numpy.cached_gaussian": np.array([cached], dtype=np.float64),
    }


def set_numpy_rng_state(state: dict) -> None:
    if "numpy.keys" in state:
        np.random.set_state(
            (
                "MT19937",
                state["numpy.keys"],
                int(state["numpy.pos"][0]),
                int(state["numpy.has_gauss"][0]),
                float(state["numpy.cached_gaussian"][0]),
            )
        )


# --------------------------------------------------------------------------- write / read
def write_checkpoint(
    adapter_path: Path,
    pos: Position,
    save_weights,
    cfg,
    backend,
    fingerprint_: dict,
    extra_state: dict | None = None,
    rank_states: list | None = None,
) -> Path:
    """checkpoints/step-NNNNNNN, atomically.  Older ones are pruned by `prune`, once this one's
    weights have been seen to compute a finite loss (`mlxft.training.session`).  `extra_state`
    (e.g. early stopping's) is stored in trainer_state.json beside the position;
    `rank_states`: every rank's backend RNG state in a data-parallel run (rank 0's is the
    backend's own); ranks 1.. are stored as `rng.rank<N>.<name>` (see `rank_rng`)."""
    target = Path(adapter_path) / CHECKPOINTS / f"step-{pos.step:07d}"
    tensors = {f"optim.{k}": np.ascontiguousarray(v) for k, v in backend.optimizer_state().items()}
    rng = dict(numpy_rng_state(), **backend.rng_state())
    for rank, state in enumerate(rank_states or [], start=0):
        if rank:
            rng.update({f"rank{rank}.{k}": v for k, v in state.items()})
    tensors.update({f"rng.{k}": np.ascontiguousarray(v) for k, v in rng.items()})
    state = {
        "format": FORMAT,
        "position": asdict(pos),
        "backend": backend.name,
        "world_size": max(1, len(rank_states or [])),
        "fingerprint": fingerprint_,
        **(extra_state or {}),
    }
    with atomic_dir(target, replace=True) as tmp:
        save_weights(tmp)
        save_config(replace(cfg, resume=False, resume_from=None), tmp / CONFIG_FILE)
        save_safetensors(tmp / STATE_TENSORS, tensors)
        write_json(tmp / STATE_JSON, state)  # last: its presence marks the checkpoint complete
    return target


def prune(adapter_path: Path, keep: int, also_keep: Path | None = None) -> None:
    """Keep the newest `keep` checkpoints (and `also_keep`, the last one known good)."""
    for _, old in checkpoint_dirs(adapter_path)[:-keep]:
        if also_keep is None or old != Path(also_keep):
            shutil.rmtree(old, ignore_errors=True)


def discard(path: Path) -> None:
    """Remove a checkpoint whose weights turned out to compute a non-finite loss."""
    shutil.rmtree(path, ignore_errors=True)


def _damaged(path: Path, problem: str) -> UserError:
    return UserError(
        f"{path}: damaged checkpoint ({problem}); resume from an earlier one with --resume-from, "
        "or start over without --resume"
    )


def _check_state(path: Path, state) -> dict:
    """trainer_state.json's shape, so a hand-edited or damaged file is one line, not a crash."""
    if not isinstance(state, dict):
        raise _damaged(path, f"{STATE_JSON} holds {type(state).__name__}, not an object")
    if state.get("format") != FORMAT:
        raise UserError(f"{path / STATE_JSON}: unknown checkpoint format {state.get('format')!r}")
    position = state.get("position")
    names = [f.name for f in fields_of(Position)]
    if not isinstance(position, dict) or sorted(position) != sorted(names):
        raise _damaged(path, f"{STATE_JSON}: 'position' must have {', '.join(names)}")
    for key, value in position.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _damaged(path, f"{STATE_JSON}: position.{key} is {value!r}, not a count")
    if not isinstance(state.get("fingerprint"), dict):
        raise _damaged(path, f"{STATE_JSON}: no 'fingerprint' object")
    return state


def read_checkpoint(path: Path) -> tuple:
    """(trainer_state.json dict, optimizer tensors, rng tensors), each file checked."""
    from safetensors.numpy import load_file

    from mlxft.model_dir import check_safetensors

    try:
        state = json.loads((path / STATE_JSON).read_text())
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError included
        raise _damaged(path, str(err).splitlines()[0]) from None
    _check_state(path, state)
    check_safetensors(
        path / STATE_TENSORS,
        "checkpoint state",
        "resume from an earlier checkpoint with --resume-from, or start over without --resume",
    )
    try:
        tensors = load_file(str(path / STATE_TENSORS))
    except Exception as err:  # safetensors' own error type, for what the header check missed
        raise _damaged(path, f"{STATE_TENSORS}: {str(err).splitlines()[0]}") from None
    optim = {k[len("optim.") :]: v for k, v in tensors.items() if k.startswith("optim.")}
    rng = {k[len("rng.") :]: v for k, v in tensors.items() if k.startswith("rng.")}
    return state, optim, rng


_RANK_KEY = re.compile(r"^rank(\d+)\.(.+)$")


def rank_rng(rng: dict, rank: int) -> dict:
    """Rank `rank`'s RNG state among a checkpoint's `rng` tensors: rank 0's under their own
    names, others' under `rank<N>.`; empty when the checkpoint has none for this rank (it was
    written by fewer processes)."""
    own = {}
    for key, value in rng.items():
        match = _RANK_KEY.match(key)
        if (int(match.group(1)) if match else 0) == rank:
            own[match.group(2) if match else key] = value
    return own


def rewind(adapter_path: Path, step: int) -> list:
    """Make the run directory describe a run that stopped at `step`: drop metrics lines and
    checkpoints after it (they belong to the abandoned continuation).  Returns notices."""
    notes = []
    later = [(s, p) for s, p in checkpoint_dirs(adapter_path) if s > step]
    for _, path in later:
        shutil.rmtree(path, ignore_errors=True)
    if later:
        notes.append(
            f"removed {len(later)} later checkpoint(s) of the abandoned continuation "
            f"(steps {', '.join(str(s) for s, _ in later)})"
        )
    metrics = Path(adapter_path) / METRICS_FILE
    if metrics.is_file():
        kept, dropped = [], 0
        for line in metrics.read_text().splitlines():
            try:
                after = json.loads(line).get("step", 0) > step
            except (ValueError, AttributeError, TypeError):
                after = True  # a line cut by the kill
            dropped += after
            if not after:
                kept.append(line)
        if dropped:
            write_text(metrics, "".join(line + "\n" for line in kept))
    return notes
