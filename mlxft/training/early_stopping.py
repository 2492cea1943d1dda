"""Early stopping, the best adapter and epoch boundaries: what the training loop asks after an
evaluation or a step, kept out of the loop so it stays a few lines there.

    monitor = EarlyStopping(patience, min_delta, save_best, adapter_path)
    stop = monitor.update(step, val_loss, save_weights)   # after each evaluation

Two notions of "best", as in Keras: `best_loss`/`best_step` is the argmin of every validation
loss so far (what `best/` holds); patience counts evaluations since the loss last fell by at least
`min_delta` below the loss of the previous such improvement.  With `min_delta: 0` they agree.

Resuming exactly: `state()` goes into the checkpoint's trainer_state.json and `load_state()` reads
it back; `best/` is hard-linked into each checkpoint (its files are never rewritten in place: a new
best replaces the directory), so a resumed run gets back the `best/` of its checkpoint's step, not
one written by the abandoned continuation.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from mlxft.fileio import atomic_dir, write_json

BEST = "best"
BEST_JSON = "best.json"  # beside adapter_config.json: {"step", "val_loss"}


class EarlyStopping:
    """Tracks validation losses; decides when to stop; keeps `adapter_path/best/`."""

    def __init__(self, patience: int | None, min_delta: float, save_best: bool, adapter_path: Path):
        self.patience, self.min_delta, self.save_best = patience, float(min_delta), bool(save_best)
        self.dir = Path(adapter_path) / BEST
        self.best_loss, self.best_step = math.inf, None
        self.reference = math.inf  # loss at the last improvement of at least min_delta
        self.bad_evals = 0  # evaluations since then
        self.stopped = False

    @property
    def active(self) -> bool:
        return self.patience is not None or self.save_best

    def describe(self) -> str | None:
        """The header line (None when neither feature is on)."""
        parts = []
        if self.patience is not None:
            delta = f" by at least {self.min_delta:g}" if self.min_delta else ""
            parts.append(
                f"stop after {self.patience} evaluations without a val-loss improvement{delta}"
            )
        if self.save_best:
            parts.append(f"best adapter kept in {self.dir}")
        return (
            ("Early stopping: " if self.patience is not None else "Best adapter: ")
            + "; ".join(parts)
            if parts
            else None
        )

    def update(
        self, step: int, val_loss: float, save_weights: Callable[[Path], None] | None = None
    ) -> bool:
        """Record the evaluation at `step`; write `best/` when it is the lowest loss so far (with
        save_best); True when patience has run out and the run should stop."""
        if val_loss < self.best_loss:
            self.best_loss, self.best_step = float(val_loss), int(step)
            if self.save_best and save_weights is not None:
                self._write_best(save_weights)
        if val_loss < self.reference - self.min_delta:
            self.reference, self.bad_evals = float(val_loss), 0
        else:
            self.bad_evals += 1
        self.stopped = self.patience is not None and self.bad_evals >= self.patience
        return self.stopped

    def reason(self, step: int) -> str:
        """The report line when the run stops early."""
        delta = f" by at least {self.min_delta:g}" if self.min_delta else ""
        return (
            f"Early stopping at step {step}: validation loss has not improved{delta} "
            f"for {self.bad_evals} evaluations (early_stopping_patience {self.patience}); "
            f"best {self.best_loss:.3f} at step {self.best_step}"
            + (f", kept in {self.dir}" if self.save_best else "")
        )

    # ------------------------------------------------------------------ resume
    def state(self) -> dict:
        """JSON-safe state for trainer_state.json (infinities as None)."""
        finite = lambda x: None if math.isinf(x) else x  # noqa: E731
        return {
            "best_loss": finite(self.best_loss),
            "best_step": self.best_step,
            "reference": finite(self.reference),
            "bad_evals": self.bad_evals,
        }

    def load_state(self, state: dict | None) -> None:
        state = state or {}
        value = lambda key: math.inf if state.get(key) is None else float(state[key])  # noqa: E731
        self.best_loss, self.best_step = value("best_loss"), state.get("best_step")
        self.reference, self.bad_evals = value("reference"), int(state.get("bad_evals", 0))

    def attach(self, checkpoint_dir: Path) -> None:
        """Put the current `best/` into a checkpoint being written (hard links where possible)."""
        if self.save_best and self.dir.is_dir():
            _link_tree(self.dir, Path(checkpoint_dir) / BEST)

    def start(self, checkpoint: Path | None, state: dict | None) -> None:
        """A fresh run drops an earlier run's `best/`; a resumed one takes back its checkpoint's."""
        if checkpoint is None:
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        self.load_state(state)
        saved = Path(checkpoint) / BEST
        if saved.is_dir():
            with atomic_dir(self.dir, replace=True) as tmp:
                _link_tree(saved, tmp)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _write_best(self, save_weights: Callable[[Path], None]) -> None:
        with atomic_dir(self.dir, replace=True) as tmp:
            save_weights(tmp)
            write_json(tmp / BEST_JSON, {"step": self.best_step, "val_loss": self.best_loss})


def _link_tree(src: Path, dst: Path) -> None:
    """Copy `src` into `dst` as hard links (a copy where the filesystem refuses links)."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


class Epochs:
    """Which steps end an epoch: every epoch has the same number of batches, so the batches
    consumed so far (`epoch * per_epoch + index`) say how many epochs are complete."""

    def __init__(self, batches_per_epoch: int):
        self.per_epoch = max(1, batches_per_epoch)

    def completed(self, pos) -> int:
        return (pos.epoch * self.per_epoch + pos.index) // self.per_epoch

    def ended(self, before: int, pos) -> int | None:
        """The epoch number (1-based) that the last step finished, or None."""
        now = self.completed(pos)
        return now if now > before else None
