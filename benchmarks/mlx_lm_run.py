"""Run `mlx_lm lora` unchanged, with our BLAS and a per-step JSON record.

    python benchmarks/mlx_lm_run.py --metrics OUT.jsonl -- <mlx_lm lora arguments>

Why a wrapper: (1) the same BLAS for both trainers: `import mlxft` loads OpenBLAS into the
process before mlx.core, exactly as for our trainer (MLXFT_BLAS=reference turns it off for
both); (2) mlx_lm 0.32 reports through a rich console, so instead of scraping it we hand its
trainer a TrainingCallback (its own public hook) that writes each report as a JSON line:
iteration, train_loss, tokens_per_second, trained_tokens, peak_memory.  Run with
--steps-per-report 1 to get one line per step.
"""

from __future__ import annotations

import json
import sys

import mlxft  # noqa: F401  (OpenBLAS before mlx.core, as for our trainer)
from mlxft import _blas


class JsonLines:
    """mlx_lm TrainingCallback writing every train/val report to a file."""

    def __init__(self, path: str):
        self.handle = open(path, "w", buffering=1)
        self.handle.write(json.dumps({"blas": _blas.status()}) + "\n")

    def on_train_loss_report(self, info: dict) -> None:
        self.handle.write(json.dumps({k: float(v) if hasattr(v, "item") else v for k, v in info.items()}) + "\n")

    def on_val_loss_report(self, info: dict) -> None:
        self.handle.write(json.dumps({k: float(v) if hasattr(v, "item") else v for k, v in info.items()}) + "\n")


def main() -> None:
    args = sys.argv[1:]
    split = args.index("--")
    mine, theirs = args[:split], args[split + 1:]
    metrics = mine[mine.index("--metrics") + 1]
    from mlx_lm import lora

    callback = JsonLines(metrics)
    lora.get_reporting_callbacks = lambda *a, **k: callback
    sys.argv = ["mlx_lm.lora", *theirs]
    lora.main()


if __name__ == "__main__":
    main()
