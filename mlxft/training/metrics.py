"""Training reports: a line on the console and a JSON line in metrics.jsonl per report.

metrics.jsonl is a public contract users plot from.  Every line has `step`, then
`train_loss` or `val_loss` (or `test_loss`), and `learning_rate`, `tokens_per_second`,
`iterations_per_second`, `trained_tokens`, `peak_memory_gb`.  Validation lines of a run with
`eval_prompts` add `samples`: [{"prompt", "output"}], the greedy generations at that step.
Every line is strict JSON: a number that is not finite is written as `null` (Python's `NaN`
token is not JSON), and the writer refuses any that slips through (`allow_nan=False`).
Each line also goes to the run's experiment trackers (`mlxft.training.trackers`, `report_to`).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import click

from mlxft import progress
from mlxft.fileio import ensure_dir, write_error
from mlxft.training.trackers import tracker_row

METRICS_FILE = "metrics.jsonl"  # one JSON object per report, in adapter_path


def strict(record: dict) -> dict:
    """`record` with every non-finite float as None (JSON null)."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }


class Reporter:
    """Prints the run's lines under a progress bar (on a terminal); appends its reports to
    metrics.jsonl and hands them to the trackers once `open` is called (after the run directory
    is prepared: nothing is written before every check passed)."""

    def __init__(
        self,
        path: Path | None,
        total_steps: int,
        quiet: bool = False,
        trackers=(),
        start_step: int = 0,
    ):
        self.path = None
        self.total = total_steps
        self.quiet = quiet
        self.trackers = []
        self._handle = None
        self._bar = progress.bar(
            total_steps,
            "Training",
            unit="step",
            initial=start_step,
            enabled=progress.on_terminal(quiet),
        )
        if path:
            self.open(path, trackers)

    def open(self, path: Path, trackers=()) -> None:
        """Append to metrics.jsonl at `path`; every row also goes to each of `trackers`."""
        self.trackers = list(trackers)
        self.path = Path(path)
        ensure_dir(self.path.parent)
        try:
            self._handle = open(self.path, "a", buffering=1)
        except OSError as err:
            raise write_error(err, self.path) from None

    def _write(self, record: dict) -> None:
        if self._handle:
            line = json.dumps(strict(record), allow_nan=False) + "\n"
            try:
                self._handle.write(line)
                self._handle.flush()
            except OSError as err:
                raise write_error(err, self.path) from None
        for tracker in list(self.trackers):
            self._call(tracker, "log", tracker_row(record), record["step"])

    def _call(self, tracker, method: str, *args) -> None:
        """A tracker that fails (a server gone, a full disk) is dropped with a warning: the run
        goes on, and metrics.jsonl still has every row."""
        try:
            getattr(tracker, method)(*args)
        except Exception as err:  # trackers raise their own error types
            self.trackers.remove(tracker)
            reason = str(err).splitlines()[0] if str(err) else ""
            click.echo(
                f"Warning: {tracker.name}: {method} failed ({type(err).__name__}: {reason}); it "
                "gets no more rows from this run, metrics.jsonl has them all",
                err=True,
            )

    def echo(self, text: str) -> None:
        if not self.quiet:
            progress.message(self._bar, lambda: click.echo(text))

    def progress(
        self, step: int, loss: float | None = None, tokens_per_second: float | None = None
    ) -> None:
        """The bar on a terminal (never in logs or pipes): step/total, ETA, loss and tok/s."""
        if self._bar.disable:
            return
        if loss is not None:
            self._bar.set_postfix_str(
                f"loss {loss:.3f}, tok/s {tokens_per_second or 0:.0f}", refresh=False
            )
        self._bar.update(step - self._bar.n)

    def train(
        self,
        step: int,
        loss: float,
        lr: float,
        its: float,
        tps: float,
        trained: int,
        peak: float,
        grad_norm: float,
        extra: dict | None = None,
    ):
        """A training report; `extra` (preference tuning's TRL metrics) joins the JSON line."""
        self._write(
            {
                "step": step,
                "train_loss": loss,
                "learning_rate": lr,
                "tokens_per_second": tps,
                "iterations_per_second": its,
                "trained_tokens": trained,
                "peak_memory_gb": peak,
                "grad_norm": grad_norm,
                **(extra or {}),
            }
        )
        self.echo(
            f"Iter {step}: train loss {loss:.3f}, lr {lr:.3e}, it/s {its:.2f}, tok/s {tps:.0f}, "
            f"trained tokens {trained}, peak mem {peak:.3f} GB"
            + (f", reward accuracy {extra['rewards/accuracies']:.3f}" if extra else "")
        )

    def evaluation(
        self,
        step: int,
        kind: str,
        loss: float,
        tokens: int,
        seconds: float,
        lr: float,
        its: float,
        tps: float,
        trained: int,
        peak: float,
        samples: list | None = None,
        extra: dict | None = None,
    ):
        """A validation (or test) report; `samples` ([{"prompt", "output"}], the eval_prompts
        generations) go into the JSON line and one console line each.  `extra`: preference
        tuning's TRL metrics, whose loss has no perplexity and whose count is in pairs."""
        record = {
            "step": step,
            f"{kind}_loss": loss,
            **({f"{kind}_pairs": tokens, **extra} if extra else {}),
            **({} if extra else {f"{kind}_perplexity": _ppl(loss), f"{kind}_tokens": tokens}),
            f"{kind}_seconds": seconds,
            "learning_rate": lr,
            "tokens_per_second": tps,
            "iterations_per_second": its,
            "trained_tokens": trained,
            "peak_memory_gb": peak,
        }
        if samples is not None:
            record["samples"] = samples
        self._write(record)
        name = {"val": "Val", "test": "Test"}[kind]
        measure = (
            f"reward accuracy {extra['rewards/accuracies']:.3f}, margin "
            f"{extra['rewards/margins']:.3f}"
            if extra
            else f"{name} ppl {_ppl(loss):.3f}"
        )
        self.echo(f"Iter {step}: {name} loss {loss:.3f}, {measure}, {name} took {seconds:.2f}s")
        for line in sample_lines(step, samples or []):
            self.echo(line)

    def close(self, adapter_dir: Path | None = None) -> None:
        """End the bar, the file and the tracker runs: `adapter_dir` when the run finished (its
        adapter becomes the trackers' artifact), None when it stopped early."""
        self._bar.close()
        if self._handle:
            with contextlib.suppress(OSError):  # a failed write was already reported
                self._handle.close()
            self._handle = None
        for tracker in list(self.trackers):
            self._call(tracker, "finish", adapter_dir)
        self.trackers = []


def sample_lines(step: int, samples: list) -> list:
    """One console line per sample: the prompt's end and the whole output, JSON-quoted."""
    lines = []
    for i, s in enumerate(samples, 1):
        prompt = s["prompt"] if len(s["prompt"]) <= 60 else "…" + s["prompt"][-59:]
        lines.append(
            f"Iter {step}: sample {i}/{len(samples)}: {json.dumps(prompt, ensure_ascii=False)} -> "
            f"{json.dumps(s['output'], ensure_ascii=False)}"
        )
    return lines


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 700.0))
