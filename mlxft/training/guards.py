"""What stops a run early, and how it stops: diverged loss, out of memory, Ctrl-C.

Each ends in one line that says what happened and what to change, never a traceback, and
never leaves poisoned weights as the final adapter.
"""

from __future__ import annotations

import math
import signal
import threading
import time

from mlxft.errors import UserError

_OOM_MARKERS = (
    "out of memory",
    "outofmemory",
    "[metal::malloc]",
    "insufficient memory",
    "std::bad_alloc",
    "cannot allocate memory",
    "failed to allocate",
    "maximum allowed buffer size",
)


def check_finite(step: int, loss: float, grad_norm: float, lr: float, cfg, last_checkpoint) -> None:
    """Stop on a NaN/inf loss or gradient norm (the weights just updated are already poisoned)."""
    bad = [
        name
        for name, value in (("loss", loss), ("gradient norm", grad_norm))
        if not math.isfinite(value)
    ]
    if not bad:
        return
    values = ", ".join(
        f"{name} {value}" for name, value in (("loss", loss), ("gradient norm", grad_norm))
    )
    kept = (
        f"last good checkpoint: {last_checkpoint}"
        if last_checkpoint
        else "no checkpoint was saved yet"
    )
    clip = (
        f"lower grad_clip (now {cfg.grad_clip:g})"
        if cfg.grad_clip
        else "set grad_clip (e.g. --grad-clip 1.0)"
    )
    raise UserError(
        f"step {step}: the {' and '.join(bad)} became non-finite ({values}); stopped without "
        f"saving these weights "
        f"({kept}). Try a lower learning_rate (now {lr:.3g}), {clip}, or check the data for broken "
        f"examples",
        every_rank=True,  # the loss and norm are the world's: every rank stops here alike
    )


def is_out_of_memory(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, MemoryError) or any(marker in text for marker in _OOM_MARKERS)


def out_of_memory(err: BaseException, cfg, tokens: int, estimate=None) -> UserError:
    """The concrete knobs, with this run's values, for an allocation failure."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    planned = f"; planned peak {estimate}" if estimate else ""
    knobs = [
        f"batch_size (now {cfg.batch_size}; raise grad_accumulation_steps to keep the effective "
        f"batch)",
        f"max_seq_length (now {cfg.max_seq_length}; longest batch {tokens} tokens)",
        f"num_layers (now {cfg.num_layers})",
    ]
    if cfg.fine_tune_type != "full":
        knobs.append(f"lora_parameters.rank (now {cfg.lora_rank})")
    if not cfg.grad_checkpoint:
        knobs.append("turn on grad_checkpoint (--grad-checkpoint)")
    if not cfg.quantize and cfg.fine_tune_type != "full":
        knobs.append("quantize the base (--quantize 4)")
    return UserError(
        f"out of memory ({first}{planned}); lower "
        + ", ".join(knobs)
        + "; `mlxft lora --dry-run` estimates the peak without training"
    )


class StopRequest:
    """Ctrl-C during training asks the loop to stop after the current step (and save a
    checkpoint) instead of tearing it down mid-update; a second Ctrl-C interrupts at once.

    In a data-parallel run (`distributed`) the terminal's Ctrl-C reaches every rank, and
    torchrun forwards it once more: a repeat within `REPEAT_SECONDS` is that same Ctrl-C, not a
    second one.  Only rank 0 (`speak`) says what happens."""

    REPEAT_SECONDS = 2.0

    def __init__(self, distributed: bool = False, speak: bool = True):
        self.requested = False
        self._previous = None
        self._first = 0.0
        self._gap = self.REPEAT_SECONDS if distributed else 0.0
        self._speak = speak

    def _handler(self, signum, frame):
        if self.requested:
            if time.monotonic() - self._first >= self._gap:
                raise KeyboardInterrupt
            return
        self.requested, self._first = True, time.monotonic()
        if self._speak:
            import click

            click.echo(
                "\nInterrupt: finishing this step, then saving a checkpoint (Ctrl-C again to "
                "quit now)",
                err=True,
            )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> bool | None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return None
