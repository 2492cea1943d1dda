"""The run directory (`adapter_path`): one run at a time, no earlier run ever lost, no leftovers.

- `RunLock`: an exclusive `flock` on `adapter_path/.mlxft.lock`, held for the whole run.  The
  kernel drops it when the process dies, so a killed run never blocks the next one; the pid
  written into the file names the holder in the second run's error, and a pid left behind by a
  killed run is reported when its lock is taken over.
- `move_aside`: a fresh run into a folder that holds an earlier run moves that run's files into
  `adapter_path/previous-runs/<time>/` (one rename per entry, so every file exists in exactly
  one place at any moment), instead of deleting them.
- `sweep`: temporaries a killed process left (`.<name>.tmp-*`, `.<name>.old-*`: the names
  `mlxft.fileio` gives them) are removed at the next start, under the lock, so they can never
  belong to a live run.

Nothing here runs before every check of the run has passed (`Session.train`): a run that fails
on its inputs leaves `adapter_path` exactly as it found it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import time
from pathlib import Path

import yaml

from mlxft.adapters.files import CONFIG_NAME, WEIGHTS_NAME
from mlxft.config import CONFIG_FILE
from mlxft.errors import UserError
from mlxft.fileio import ensure_dir, temp_leftover, write_error
from mlxft.model_dir import AUX_PATTERNS
from mlxft.training.checkpoint import CHECKPOINTS
from mlxft.training.metrics import METRICS_FILE
from mlxft.training.trackers import IDS_FILE

LOCK_FILE = ".mlxft.lock"
PREVIOUS_RUNS = "previous-runs"
STAGING = ".model-staging"  # mlxft.adapters.files.save_full_model's staging directory
# What a run writes into adapter_path (a full fine-tune adds a model directory's files).  The
# trackers' own stores (runs/, wandb/, mlflow/) stay: each holds many runs, and a fresh run is a
# new run there; only the ids of the runs this directory continues (trackers.json) move aside.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, CHECKPOINTS, CONFIG_NAME, WEIGHTS_NAME, IDS_FILE)
MODEL_PATTERNS = ("config.json", "model*.safetensors", "model.safetensors.index.json")


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return ""
    return pid if pid.isdigit() else ""


def check_unlocked(adapter_path: Path) -> None:
    """Fail early (before any model loads) when another run holds `adapter_path`; opens an
    existing lock file read-only, so nothing is created or changed."""
    path = Path(adapter_path) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(adapter_path, _holder(path)) from None
    except OSError:
        return  # a filesystem without flock: RunLock says so when the run starts
    finally:
        os.close(fd)


def _busy(adapter_path: Path, pid: str) -> UserError:
    who = f"pid {pid}" if pid else "another process"
    return UserError(
        f"adapter_path: {adapter_path} is in use by another mlxft run ({who}); wait for it to "
        "finish, stop it, or choose another --adapter-path"
    )


class RunLock:
    """`with RunLock(path) as lock:` holds `path` exclusively; `lock.notes` says whether a
    stale lock (a killed run's) was taken over."""

    def __init__(self, adapter_path: Path):
        self.dir = Path(adapter_path)
        self.path = self.dir / LOCK_FILE
        self.fd: int | None = None
        self.notes: list = []

    def __enter__(self) -> RunLock:
        ensure_dir(self.dir)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise write_error(err, self.path) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _holder(self.path)
                os.close(fd)
                raise _busy(self.dir, pid) from None
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                self.notes.append(
                    f"{self.dir}: this filesystem has no file locks; nothing stops "
                    "a second run from writing here at the same time"
                )
            # the holder may have removed the file between our open and our lock: lock anew
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _holder(self.path)
        if stale and int(stale) != os.getpid():
            self.notes.append(
                f"took over the lock of an earlier run in {self.dir} (pid {stale}), which ended "
                "without releasing it (killed?)"
            )
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as err:
            self.__exit__()
            raise write_error(err, self.path) from None
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()  # while still locked: a waiting opener re-checks the inode
            os.close(self.fd)
            self.fd = None


# ---------------------------------------------------------------------------- leftovers
def sweep(adapter_path: Path) -> int:
    """Remove what killed writers left in the run directory and its checkpoints folder; call
    with the lock held.  Returns how many entries went."""
    removed = 0
    for folder in (Path(adapter_path), Path(adapter_path) / CHECKPOINTS):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if temp_leftover(entry.name) or entry.name == STAGING:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        entry.unlink()
                removed += 1
    return removed


# ---------------------------------------------------------------------------- earlier runs
def _was_full(adapter_path: Path) -> bool:
    try:
        saved = yaml.safe_load((adapter_path / CONFIG_FILE).read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(saved, dict) and saved.get("fine_tune_type") == "full"


def earlier_run(adapter_path: Path, model_files: bool = True) -> list:
    """The entries of an earlier run in `adapter_path` (empty when there is none); a full
    fine-tune's model files too, unless `model_files` is off (this run trains that model)."""
    adapter_path = Path(adapter_path)
    if not adapter_path.is_dir():
        return []
    found = [adapter_path / name for name in RUN_FILES if (adapter_path / name).exists()]
    if found and model_files and _was_full(adapter_path):
        for pattern in MODEL_PATTERNS + AUX_PATTERNS:
            found += [p for p in sorted(adapter_path.glob(pattern)) if p not in found]
    return found


def move_aside(adapter_path: Path, model_files: bool = True) -> str | None:
    """Move an earlier run's files into `previous-runs/<time>/` (call with the lock held).

    Each entry is one rename on the same filesystem: a crash part-way leaves every file either
    in its old place or in the new folder, never lost; the next fresh run moves the rest."""
    entries = earlier_run(adapter_path, model_files)
    if not entries:
        return None
    root = Path(adapter_path) / PREVIOUS_RUNS
    ensure_dir(root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = root / stamp, 1
    while True:
        try:
            target.mkdir()
            break
        except FileExistsError:
            n += 1
            target = root / f"{stamp}-{n}"
        except OSError as err:
            raise write_error(err, target) from None
    for entry in entries:
        try:
            os.replace(entry, target / entry.name)
        except OSError as err:
            raise write_error(err, target / entry.name) from None
    return (
        f"moved the earlier run in {adapter_path} ({', '.join(e.name for e in entries[:4])}"
        f"{', …' if len(entries) > 4 else ''}) to {target}; delete it when you no longer need it"
    )
