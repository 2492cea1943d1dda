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


def _advice(cfg, lr: float, last_good) -> str:
    kept = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was saved yet"
    clip = (
        f"lower grad_clip (now {cfg.grad_clip:g})"
        if cfg.grad_clip
        else "set grad_clip (e.g. --grad-clip 1.0)"
    )
    return (
        f"stopped without saving these weights ({kept}). Try a lower learning_rate "
        f"(now {lr:.3g}), {clip}, or check the data for broken examples"
    )


def check_step(step, cfg, last_good) -> None:
    """Stop on a step that went bad: its loss (computed with the weights of the step before),
    its gradient norm, or the weights and optimizer state after its update
    (`StepResult.weights_finite`).  `last_good` is the newest checkpoint whose weights were seen
    to compute a finite loss."""
    bad = [
        name
        for name, ok in (
            ("loss", math.isfinite(step.loss)),
            ("gradient norm", math.isfinite(step.grad_norm)),
            ("updated weights", step.weights_finite),
        )
        if not ok
    ]
    if not bad:
        return
    values = f"loss {step.loss:.4g}, gradient norm {step.grad_norm:.4g}"
    if not step.weights_finite:
        values += ", weights or optimizer state NaN/inf, or overflowing float32 when squared"
    raise UserError(
        f"step {step.step}: the {' and '.join(bad)} became non-finite ({values}); "
        + _advice(cfg, step.learning_rate, last_good),
        every_rank=True,  # the loss, norm and weights are the world's: every rank stops alike
    )


def check_evaluation(step: int, loss: float, lr: float, cfg, last_good) -> None:
    """A validation loss that is not finite: at step 0 the base model itself overflows; later,
    the weights after `step` are diverged and must not be saved."""
    if math.isfinite(loss):
        return
    if step == 0:
        raise UserError(
            f"{cfg.model}: the validation loss of the model before any training is {loss} "
            f"(dtype {cfg.dtype}); its weights overflow or hold NaN/inf. Try --dtype float32 "
            "or check the model files",
            every_rank=True,
        )
    raise UserError(
        f"step {step}: the validation loss became non-finite ({loss}) with the weights after "
        f"this step; " + _advice(cfg, lr, last_good),
        every_rank=True,
    )


def collapsed(loss: float, grad_norm: float, vocab_size: int | None) -> str | None:
    """A warning when training has stalled at a uniform prediction: the loss sits at
    ln(vocabulary size) and no gradient flows (saturated weights, typically from a far too
    high learning rate), so no further step can change anything."""
    if not vocab_size or vocab_size < 2 or grad_norm > 1e-10:
        return None
    uniform = math.log(vocab_size)
    if abs(loss - uniform) > 1e-3 * uniform:
        return None
    return (
        f"the loss is stuck at ln(vocabulary size) = {uniform:.4f} with zero gradients: the "
        "model predicts every token as equally likely and cannot learn any more (its weights "
        "saturated, usually from a far too high learning_rate). Stop and start again with a "
        "lower learning_rate"
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
